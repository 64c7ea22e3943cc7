"""What every host's e2e tests share: a finished CLI run, the pool that runs two at a time, and
the selection of the runs the selected tests read (``@pytest.mark.runs``, docs/testing.md)."""

from __future__ import annotations

import ast
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

LOG_LINE = re.compile(r"\{'loss': .*?\}")
"""A transformers ``Trainer`` training log line as printed on the console (rank 0)."""


@dataclass
class Run:
    """A finished CLI run: its directory (the output is ``directory / "out"``), console output and exit code."""

    name: str
    directory: Path
    output: str
    returncode: int

    @property
    def output_dir(self) -> Path:
        return self.directory / "out"

    def steps(self) -> list[dict[str, float]]:
        """The training log lines printed on the console (one per optimizer step with ``logging_steps: 1``)."""
        lines = [ast.literal_eval(match) for match in LOG_LINE.findall(self.output)]
        return [{key: float(value) for key, value in line.items()} for line in lines]

    def check(self) -> "Run":
        assert self.returncode == 0, f"{self.name} failed:\n{self.output[-6000:]}"
        return self


def max_diff(a: dict, b: dict) -> float:
    """``max |a - b|`` over two weight dicts of the same layout (names and shapes)."""
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), "the models differ in layout"
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


def assert_zero3_sharded(step_dir: Path, model: dict) -> None:
    """DeepSpeed ZeRO-3 held the weights of ``model`` (the saved full weights) in shards on 2 ranks.

    Read from a checkpoint's ``global_stepN`` folder ``step_dir``: each rank's
    ``zero_pp_rank_R_mp_rank_00_model_states.pt`` keeps every module weight empty (0 elements, the
    shapes in ``param_shapes``; ZeRO-2 writes one whole ``mp_rank_00_model_states.pt`` instead), and
    each rank's ``..._optim_states.pt`` its fp32 partition: a part of the model's elements, the two
    partitions together all of them.
    """
    import torch

    total = sum(weight.numel() for weight in model.values())
    parts = []
    for rank in (0, 1):
        states = torch.load(step_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)
        assert states["dp_world_size"] == 2 and set(states["module"]) == set(model)
        assert all(weight.numel() == 0 for weight in states["module"].values())
        optim = torch.load(step_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        parts.append(sum(group.numel() for group in optim["optimizer_state_dict"]["fp32_flat_groups"]))
    assert all(0 < part < total for part in parts) and sum(parts) >= total, (parts, total)


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
