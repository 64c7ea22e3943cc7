"""Micro-batches for the MLX trainer: mlx-lm's datasets and batching, with a correct loss mask.

mlx-lm's ``iterate_batches`` yields ``(tokens [B, L] int32, lengths [B, 2])`` where each row of
``lengths`` is ``(offset, length)``: the first response token's position and the sequence
length, padding after it. mlx-lm's ``default_loss`` masks target positions ``offset <= t+1 <=
length``, which counts one padding position per sequence (``t+1 == length``). Here the
response targets are ``max(offset, 1) <= t+1 < length``: exactly the real tokens after the
prompt, never padding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import numpy as np


@dataclass
class MicroBatch:
    """One forward/backward's worth of sequences, already shifted.

    Attributes:
        inputs: ``[B, T]`` int32 token ids fed to the model.
        targets: ``[B, T]`` int32 ids the logits at each position predict (``inputs`` shifted by one).
        mask: ``[B, T]`` float32, 1 on response tokens, 0 on prompt and padding.
        tokens: number of response tokens (``mask.sum()``) as a Python int.
        rows: number of sequences with at least one response token.
        old_logp: ``[B, T]`` float32 log-probs under the old policy, stamped by a refresh;
            ``None`` means "take them from the training forward itself" (r = 1).
    """

    inputs: mx.array
    targets: mx.array
    mask: mx.array
    tokens: int
    rows: int
    old_logp: Optional[mx.array] = None


def response_mask(lengths: mx.array, width: int) -> mx.array:
    """``[B, 2]`` (offset, length) rows -> ``[B, width]`` float32 mask over shifted targets.

    Target index ``t`` holds the token at position ``t + 1``; it is a response token when
    ``offset <= t + 1 < length``. Position 0 is never a target (nothing predicts it).
    """
    positions = mx.arange(1, width + 1)[None, :]
    offsets, ends = lengths[:, 0:1], lengths[:, 1:2]
    return ((positions >= offsets) & (positions < ends)).astype(mx.float32)


def to_micro_batch(tokens: mx.array, lengths: mx.array) -> MicroBatch:
    """Shift an mlx-lm ``(tokens [B, L], lengths [B, 2])`` batch into a :class:`MicroBatch`."""
    mask = response_mask(lengths, tokens.shape[1] - 1)
    per_row = mask.sum(axis=1)
    mx.eval(mask, per_row)
    return MicroBatch(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        mask=mask,
        tokens=int(per_row.sum().item()),
        rows=int((per_row > 0).sum().item()),
    )


def iterate_micro_batches(
    dataset: Any,
    batch_size: int,
    max_seq_length: int,
    *,
    loop: bool,
    seed: Optional[int] = None,
    iterate_batches: Optional[Callable[..., Iterator]] = None,
    skip: int = 0,
) -> Iterator[MicroBatch]:
    """mlx-lm's batching (length-sorted buckets, shuffled per epoch) as :class:`MicroBatch` es.

    ``iterate_batches`` defaults to :func:`mlx_lm.tuner.trainer.iterate_batches`; pass another
    with the same signature to change the order or padding. ``skip`` drops that many batches
    first (a resumed run continues the same order).
    """
    if iterate_batches is None:
        from mlx_lm.tuner.trainer import iterate_batches
    batches = iterate_batches(
        dataset=dataset, batch_size=batch_size, max_seq_length=max_seq_length, loop=loop, seed=seed
    )
    for tokens, lengths in itertools.islice(batches, skip, None):
        yield to_micro_batch(tokens, lengths)


def trainable_tokens(item: tuple[list[int], int], max_seq_length: int) -> int:
    """Response tokens a processed ``(tokens, offset)`` example contributes after truncation."""
    tokens, offset = item
    return max(0, min(len(tokens), max_seq_length) - max(offset, 1))


def first_trainable(dataset: Any, max_seq_length: int) -> Optional[int]:
    """Index of the first example with a response token, or ``None`` if there is none.

    Stops at the first hit, so a healthy dataset costs one tokenization; only a broken one is
    scanned in full.
    """
    for index in range(len(dataset)):
        if trainable_tokens(dataset[index], max_seq_length) > 0:
            return index
    return None


class RestoredNumpyRandom:
    """Context manager restoring NumPy's global RNG on exit.

    mlx-lm's batching shuffles with the global NumPy RNG; evaluating in the middle of training
    would otherwise change the training order of later epochs.
    """

    def __enter__(self) -> "RestoredNumpyRandom":
        self.state = np.random.get_state()
        return self

    def __exit__(self, *exc: object) -> None:
        np.random.set_state(self.state)
