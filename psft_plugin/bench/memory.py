"""Peak-memory probes that work on CPU (where torch has no allocator statistics), and the
interleaving shared by the step benchmarks.

torch (CPU): the process's peak resident set (``VmHWM``) is reset through
``/proc/self/clear_refs`` before the measured call. Freed buffers must go back to the OS for
that to mean anything, so workers run with ``MALLOC_MMAP_THRESHOLD_`` set (see
:data:`WORKER_ENV`): glibc then serves every large allocation with mmap and unmaps it on free.
On CUDA the allocator's own peak counter is used instead. MLX: ``mx.get_peak_memory``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) * 1024


def torch_peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def mlx_peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes MLX allocated at the peak of ``fn()`` (which must evaluate its results)."""
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    fn()
    return mx.get_peak_memory() - base


def interleaved(
    rounds: int, train: Callable[[str], tuple[list[float], int]], forward_seconds: Callable[[], float]
) -> dict[str, Any]:
    """Run ``train("sft")`` and ``train("psft")`` alternately (SFT first in even rounds).

    ``train`` returns ``(seconds per step, peak bytes)`` of one run; ``forward_seconds`` times
    one refresh forward and is called once per round. Returns the raw figures by mode.
    """
    step_seconds: dict[str, list[float]] = {"sft": [], "psft": []}
    peak_bytes: dict[str, list[int]] = {"sft": [], "psft": []}
    forward: list[float] = []
    for round_index in range(rounds):
        for mode in ("sft", "psft") if round_index % 2 == 0 else ("psft", "sft"):
            seconds, peak = train(mode)
            step_seconds[mode] += seconds
            peak_bytes[mode].append(peak)
        forward.append(forward_seconds())
    return {"step_seconds": step_seconds, "peak_bytes": peak_bytes, "forward_seconds": forward}
