"""Run the real ``axolotl train`` CLI on the tiny model, two runs at a time, and read the results.

Every run starts from the shipped ``configs/axolotl/tiny.yml`` with per-run overrides, in its
own directory under pytest's tmp dir. Runs are submitted together so that the 2-core machine
works on two at once; a run that resumes from another's checkpoint waits for it.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from suite_env import SUITE_ENV

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "axolotl" / "tiny.yml"
CPU_SITE = ROOT / "tests" / "cpu_site"  # test-only patches for CPU machines, see its sitecustomize
BIN = Path(sys.executable).parent
LOG_LINE = re.compile(r"\{'loss': .*?\}")


@dataclass
class Run:
    """A finished ``axolotl train``: its directory, output, parsed step logs and exit code."""

    name: str
    directory: Path
    output: str
    returncode: int

    @property
    def output_dir(self) -> Path:
        return self.directory / "out"

    def steps(self) -> list[dict[str, float]]:
        """The training log lines (one per optimizer step with ``logging_steps: 1``), rank 0 only."""
        lines = [ast.literal_eval(match) for match in LOG_LINE.findall(self.output)]
        return [{key: float(value) for key, value in line.items()} for line in lines]

    def check(self) -> "Run":
        assert self.returncode == 0, f"axolotl train ({self.name}) failed:\n{self.output[-6000:]}"
        return self


def config(model_dir: Path, data_dir: Path, directory: Path, **overrides: Any) -> dict:
    """The shipped tiny config, pointed at ``model_dir``/``data_dir``, with ``overrides``."""
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg.update(
        base_model=str(model_dir), dataset_prepared_path=str(directory / "prepared"), output_dir=str(directory / "out")
    )
    cfg["datasets"] = [dict(cfg["datasets"][0], path=str(data_dir / "train.jsonl"))]
    cfg.update(overrides)
    return {key: value for key, value in cfg.items() if value is not None}


def train(
    directory: Path,
    cfg: dict,
    processes: int = 1,
    name: str = "",
    env: Optional[dict[str, str]] = None,
) -> Run:
    """``axolotl train cfg.yml`` in a subprocess (``torchrun`` with gloo for several processes).

    ``env`` adds environment variables (e.g. ``PSFT_TEST_CPU_ENGINE=1`` for the engine tests); its
    ``PYTHONPATH`` is put after the test-only patches of ``tests/cpu_site``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    extra = dict(env or {})
    env = dict(
        os.environ,
        **SUITE_ENV,  # offline, one thread, no telemetry (Axolotl's blocks at exit without network)
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(CPU_SITE), extra.pop("PYTHONPATH", None), os.environ.get("PYTHONPATH")])
        ),
    )
    env.update(extra)
    command = [str(BIN / "axolotl"), "train", str(path)]
    if processes > 1:
        # CPU data parallel: accelerate joins torchrun's gloo group only with ACCELERATE_USE_CPU.
        env["ACCELERATE_USE_CPU"] = "true"
        command += ["--launcher", "torchrun", "--", "--standalone", f"--nproc_per_node={processes}"]
    else:
        command += ["--launcher", "python"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=600)
    print(f"axolotl train {name or directory.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return Run(name or directory.name, directory, done.stdout + done.stderr, done.returncode)


def runs_read_by_selected_tests(request: Any) -> set[str]:
    """The runs named by ``@pytest.mark.runs(...)`` on the selected tests of ``request``'s module.

    A name may hold the test's parameters as ``str.format`` fields (``"{engine}-ce"``). Only these
    runs are started: a test deselected on this line (``-k``, ``axolotl_line``) costs no run.
    """
    names = set()
    for item in request.session.items:
        if item.module is request.module:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            names.update(name.format(**params) for marker in item.iter_markers("runs") for name in marker.args)
    return names


class RunPool:
    """Submits runs to two workers; ``result(name)`` waits for one.

    With ``wanted``, a run not in it is not submitted; a run that resumes from another
    (``after=``) needs that one submitted first, or the submission is an error.
    """

    def __init__(self, workers: int = 2, wanted: Optional[set[str]] = None):
        self.executor = ThreadPoolExecutor(max_workers=workers)
        self.futures: dict[str, Future] = {}
        self.wanted = wanted

    def submit(self, name: str, job: Callable[[], Run], after: Optional[str] = None) -> None:
        if self.wanted is not None and name not in self.wanted:
            return
        if after is not None and after not in self.futures:
            raise KeyError(f"run {name!r} resumes from {after!r}, which was not submitted before it (mark both)")
        parent = self.futures.get(after) if after else None
        self.futures[name] = self.executor.submit(lambda: (parent.result() if parent else None, job())[1])

    def result(self, name: str) -> Run:
        if name not in self.futures:
            raise KeyError(f"run {name!r} was not started: add it to the test's @pytest.mark.runs(...)")
        return self.futures[name].result()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
