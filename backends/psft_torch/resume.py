"""The old-policy window saved with a checkpoint, so that a resume from inside a window is exact.

docs/objective.md section 2. The steps of a window train against old log-probs stamped with the
weights at the window's start. A checkpoint taken inside a window holds later weights, so
stamping those steps again on resume would give them another old policy (the run drifts: 4e-2
in weights on the tiny model, tests/host_axolotl/test_resume.py). The trainer therefore writes, next to each
checkpoint, every rank's micro-batches not yet trained in its window (``psft_window_rank{N}.pt``:
per micro-batch its ``[B, T]`` float32 old log-probs and the token ids and labels they were
computed for), and the resumed run uses them for those micro-batches instead of stamping.

The saved token ids are compared with the micro-batches the resumed run actually reads: after a
change of data, batch size, gradient accumulation or number of processes the log-probs would
belong to other tokens, and the window is stamped again with a warning instead of training
wrong ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from psft_plugin.window import Window

WINDOW_FILE = "psft_window_rank{rank}.pt"
FORMAT = 1
"""Version of the file's layout; a file of another version is not restored."""
MATCHED_KEYS = ("input_ids", "labels", "shift_labels")
"""Micro-batch entries saved with the old log-probs and compared on resume (those present)."""
OLD_KEY = "old_logp"


@dataclass
class SavedWindow:
    """One rank's micro-batches left in its window when a checkpoint was saved.

    Attributes:
        step: the optimizer step (from 0) the first saved group trains at, the checkpoint's ``global_step``.
        world_size: data-parallel processes of the run that saved it (each saved its own share).
        groups: per optimizer step, per micro-batch: ``{"old_logp": [B, T] float32, "input_ids": [B, T],
            "labels": [B, T], ...}`` on the CPU.
    """

    step: int
    world_size: int
    groups: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)


def window_file(checkpoint: str | Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its window in the checkpoint directory ``checkpoint``."""
    return Path(checkpoint) / WINDOW_FILE.format(rank=rank)


def remaining(window: Optional[Window], old_logp_key: str, step: int, world_size: int) -> SavedWindow:
    """The stamped micro-batches ``window`` has not trained yet (none at a window boundary), on the CPU."""
    groups = []
    for group, _kind in window.groups if window is not None else ():
        if not all(old_logp_key in batch for batch in group):
            break  # only stamped groups are left inside a window; anything else is stamped anew
        groups.append([_record(batch, old_logp_key) for batch in group])
    return SavedWindow(step, world_size, groups)


def _record(batch: dict[str, Any], old_logp_key: str) -> dict[str, torch.Tensor]:
    record = {OLD_KEY: batch[old_logp_key].detach().float().cpu()}
    for key in MATCHED_KEYS:
        if isinstance(batch.get(key), torch.Tensor):
            record[key] = batch[key].detach().cpu()
    return record


def save(saved: SavedWindow, checkpoint: str | Path, rank: int) -> Path:
    """Write ``saved`` as rank ``rank``'s window file of ``checkpoint`` (the directory is created if needed)."""
    path = window_file(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "step": saved.step, "world_size": saved.world_size, "groups": saved.groups}, path)
    return path


def load(checkpoint: str | Path, rank: int) -> Optional[SavedWindow]:
    """Rank ``rank``'s saved window of ``checkpoint``, or ``None`` when the checkpoint has none (or another format)."""
    path = window_file(checkpoint, rank)
    if not path.is_file():
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("format") != FORMAT:
        return None
    return SavedWindow(int(data["step"]), int(data["world_size"]), data["groups"])


def mismatch(saved: SavedWindow, groups: list[list[dict]], step: int, world_size: int) -> Optional[str]:
    """Why ``saved`` does not belong to ``groups`` (what the resumed run trains next from ``step``), or ``None``."""
    if saved.step != step or saved.world_size != world_size:
        return (
            f"it was saved at step {saved.step} on {saved.world_size} process(es), "
            f"the run resumes at step {step} on {world_size}"
        )
    if len(groups) > len(saved.groups):
        return f"it holds {len(saved.groups)} optimizer step(s), the window needs {len(groups)}"
    for index, (group, records) in enumerate(zip(groups, saved.groups)):
        if len(group) != len(records):
            return (
                f"step {step + index} has {len(group)} micro-batch(es), {len(records)} were saved "
                f"(`gradient_accumulation_steps` changed?)"
            )
        for number, (batch, record) in enumerate(zip(group, records)):
            for key in (key for key in MATCHED_KEYS if key in record):
                difference = _difference(batch.get(key), record[key])
                if difference:
                    where = f"step {step + index}, micro-batch {number}"
                    return f"{where}: `{key}` {difference} (other data, order or batch size?)"
    return None


def _difference(value: Any, saved: torch.Tensor) -> Optional[str]:
    """How a micro-batch entry differs from the saved one, or ``None`` when they are equal."""
    if not isinstance(value, torch.Tensor):
        return "is missing"
    if value.shape != saved.shape:
        return f"has shape {tuple(value.shape)}, the saved one {tuple(saved.shape)}"
    return None if torch.equal(value.cpu(), saved) else "holds other tokens than the saved one"


def attach(saved: SavedWindow, groups: list[list[dict]], old_logp_key: str) -> None:
    """Put the saved old log-probs on the micro-batches of ``groups`` (checked with :func:`mismatch` first)."""
    for group, records in zip(groups, saved.groups):
        for batch, record in zip(group, records):
            batch[old_logp_key] = record[OLD_KEY]
