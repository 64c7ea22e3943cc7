"""The old-policy window: which optimizer steps share one snapshot of old log-probs.

PSFT_SPEC.md section 2. Every ``K`` optimizer steps the trainer takes the next ``K`` steps'
worth of micro-batches (``K`` groups of gradient-accumulation micro-batches, per rank),
stamps old log-probs on them with the current weights, then trains on them in order. This
module holds the bookkeeping only (no model, no torch ops), so it can be tested on its own.

Windows are aligned to the optimizer step counter: after ``warmup`` plain SFT steps a window
starts at every step ``s`` with ``(s - warmup) % K == 0``. That makes a resume from a checkpoint
taken at a window boundary reproduce the uninterrupted run; a resume in the middle of a window
(or a new epoch that starts mid-window) opens a shortened window that ends at the next
boundary, whose old policy is the weights at the resume point.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

SFT, FIRST, STAMPED = "sft", "first", "stamped"
"""Group kinds: a warm-up SFT step; the first group of a window, whose old log-probs are the
training forward's own (r = 1 exactly); a later group carrying stamped old log-probs."""


def window_length(global_step: int, max_steps: int, refresh_steps: int, warmup_steps: int) -> int:
    """Optimizer steps in the window that starts at ``global_step`` (at least 1).

    Warm-up steps are windows of one SFT step. The window never runs past ``max_steps``
    (``max_steps <= 0`` means unknown), so no old log-probs are stamped for steps never taken.
    """
    if global_step < warmup_steps:
        return 1
    length = refresh_steps - (global_step - warmup_steps) % refresh_steps
    if max_steps > 0:
        length = min(length, max(max_steps - global_step, 1))
    return length


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
    """Groups of micro-batches still to train in the current window, read from ``iterator``.

    ``iterator`` is kept by reference (not ``id()``): a new epoch's iterator may reuse the
    address of a freed one, and must still open a fresh window.
    """

    iterator: Optional[Iterator]
    groups: deque = field(default_factory=deque)

    def serves(self, iterator: Iterator) -> bool:
        """True while this window has groups left that came from ``iterator``."""
        return self.iterator is iterator and bool(self.groups)

    def pop(self) -> tuple[list[Any], str]:
        """The next ``(group, kind)`` to train."""
        return self.groups.popleft()
