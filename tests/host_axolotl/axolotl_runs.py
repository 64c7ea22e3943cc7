"""Run the real ``axolotl train`` CLI on the tiny model, two runs at a time, and read the results.

Every run starts from the shipped ``configs/axolotl/tiny.yml`` with per-run overrides, in its
own directory under pytest's tmp dir. Runs are submitted together so that the 2-core machine
works on two at once; a run that resumes from another's checkpoint waits for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from cli_runs import Run
from suite_env import SUITE_ENV

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "axolotl" / "tiny.yml"
CPU_SITE = ROOT / "tests" / "cpu_site"  # test-only patches for CPU machines, see its sitecustomize
BIN = Path(sys.executable).parent


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
