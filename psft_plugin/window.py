"""The old-policy window: which optimizer steps share one snapshot of old log-probs.

docs/objective.md section 2. Every ``K`` optimizer steps the trainer takes the next ``K`` steps'
worth of micro-batches (``K`` groups of gradient-accumulation micro-batches, per rank),
stamps old log-probs on them with the current weights, then trains on them in order. This
module is the schedule only: plain Python, no framework, no model. Both backends (the torch
trainer and the MLX loop) open their windows here and differ only in how they stamp.

Windows are aligned to the optimizer step counter: after ``warmup`` plain SFT steps a window
starts at every step ``s`` with ``(s - warmup) % K == 0`` (steps counted from 0). That makes a
resume from a checkpoint taken at a window boundary reproduce the uninterrupted run. A resume in
the middle of a window opens a shortened window that ends at the next boundary: the host either
restores the old log-probs it saved with the checkpoint for those steps (``restore``, the torch
trainer does), which reproduces the uninterrupted run, or stamps them with the weights at that
point (as at a new epoch that starts mid-window).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

SFT, FIRST, STAMPED = "sft", "first", "stamped"
"""Group kinds: a warm-up SFT step; the first group of a window, whose old log-probs are the
training forward's own (r = 1 exactly); a later group carrying stamped old log-probs."""


def window_length(step: int, max_steps: int, refresh_steps: int, warmup_steps: int) -> int:
    """Optimizer steps in the window that starts at ``step`` (counted from 0; at least 1).

    Warm-up steps are windows of one SFT step. The window never runs past ``max_steps``
    (``max_steps <= 0`` means unknown), so no old log-probs are stamped for steps never taken.
    """
    if step < warmup_steps:
        return 1
    length = refresh_steps - (step - warmup_steps) % refresh_steps
    if max_steps > 0:
        length = min(length, max(max_steps - step, 1))
    return length


def starts_window(step: int, refresh_steps: int, warmup_steps: int) -> bool:
    """True when optimizer ``step`` (from 0) is the first of its window: no earlier step shares its old policy."""
    return step < warmup_steps or (step - warmup_steps) % refresh_steps == 0


def group_kinds(step: int, count: int, warmup_steps: int) -> list[str]:
    """The kinds of a window's ``count`` groups when it starts at ``step``: ``[SFT]`` or ``[FIRST, STAMPED...]``."""
    return [SFT if step < warmup_steps else FIRST] + [STAMPED] * (count - 1)


def take_groups(iterator: Iterator, first_size: int, group_size: int, count: int) -> list[list[Any]]:
    """Up to ``count`` groups of micro-batches from ``iterator``: ``first_size`` then ``group_size`` each.

    Stops early, keeping a short last group, when the iterator is exhausted (an epoch's end).
    An exhausted iterator gives ``[[]]``: one empty group, which the host treats as "no step".
    """
    groups: list[list[Any]] = []
    for index in range(count):
        size = first_size if index == 0 else group_size
        group = []
        for _ in range(size):
            try:
                group.append(next(iterator))
            except StopIteration:
                break
        if group or not groups:
            groups.append(group)
        if len(group) < size:
            break
    return groups


@dataclass
class Window:
    """Groups of micro-batches still to train in the current window, read from ``source``.

    ``source`` is kept by reference (not ``id()``): a new epoch's iterator may reuse the
    address of a freed one, and must still open a fresh window.
    """

    source: Optional[Iterator]
    groups: deque = field(default_factory=deque)

    def serves(self, source: Iterator) -> bool:
        """True while this window has groups left that came from ``source``."""
        return self.source is source and bool(self.groups)

    def pop(self) -> tuple[list[Any], str]:
        """The next ``(group, kind)`` to train."""
        return self.groups.popleft()


def open_window(
    source: Iterator,
    step: int,
    *,
    max_steps: int,
    refresh_steps: int,
    warmup_steps: int,
    first_size: int,
    group_size: int,
    stamp: Callable[[list[Any]], None],
    whole_groups_only: bool = False,
    restore: Optional[Callable[[list[list[Any]]], bool]] = None,
) -> Window:
    """Read the window that starts at optimizer ``step`` (from 0) and stamp all but its first group.

    ``stamp(micro_batches)`` sets the old log-probs of the later groups' micro-batches under the
    current weights; it is not called when there is nothing to stamp (warm-up, ``K = 1``).
    ``whole_groups_only`` drops a short last group before stamping (the MLX loop, like
    ``mlx_lm``, never trains a partial step); the window may then hold no group at all.
    ``restore(groups)``, given on the first window after a resume from inside a window, sets the
    old log-probs of *every* group from the checkpoint and returns True (all groups then train as
    stamped, nothing is stamped); False leaves the groups untouched and they are stamped as usual.
    """
    length = window_length(step, max_steps, refresh_steps, warmup_steps)
    groups = take_groups(source, first_size, group_size, length)
    if whole_groups_only:
        groups = [
            group for index, group in enumerate(groups) if len(group) == (first_size if index == 0 else group_size)
        ]
    if restore is not None and restore(groups):
        return Window(source, deque((group, STAMPED) for group in groups))
    later = [batch for group in groups[1:] for batch in group]
    if later:
        stamp(later)
    return Window(source, deque(zip(groups, group_kinds(step, len(groups), warmup_steps))))
