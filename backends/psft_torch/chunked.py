"""Log-probs straight from hidden states, a chunk of tokens at a time.

A training forward normally builds ``[B, T, V]`` logits (plus a float32 copy) before any
log-prob is taken; at long sequences and large vocabularies that dominates memory. Here only the
positions that have a target are kept, the LM head is applied to ``chunk_size`` of them at a time,
and each chunk is recomputed in the backward pass (activation checkpointing), so no more than one
chunk's ``[chunk, V]`` logits exist at once, forward or backward. The result feeds
:func:`psft_torch.psft_loss` unchanged.

The head is any callable ``[N, H] -> [N, V]`` (for a model: its ``lm_head`` module, called
through ``__call__`` so that PEFT adapters and ZeRO-3's parameter gathering apply, followed by
the model's own logit transform). :mod:`psft_torch.lm_head` runs this inside the model's forward.

Why not TRL's ``_ChunkedLogProbFunction`` (``trl.trainer.patch_chunked_lm_head``): it multiplies
by ``lm_head.weight`` read directly, which silently drops a LoRA adapter on the head and, under
ZeRO-3, sees an empty partition outside the module's call; it knows softcapping and
``logit_scale`` but not Granite's ``logits_scaling``; and it chunks the vocabulary for all
positions at once with a float32 ``[V, H]`` weight-gradient buffer. Measured against it on CPU
(``python -m psft_plugin.bench.trl_compare``), see docs/bench.md.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from psft_plugin.spec import IGNORE_INDEX
from psft_torch.loss import _TokenLogprobs

Head = Callable[[torch.Tensor], torch.Tensor]
"""``[N, H]`` hidden states -> ``[N, V]`` logits (any dtype), differentiable in both."""


def _head_chunk(
    head: Head, rows: torch.Tensor, targets: torch.Tensor, entropy: list[bool]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs (and entropy while ``entropy[0]``) of ``[c, H]`` rows against ``[c]`` targets."""
    logp, ent = _TokenLogprobs.apply(head(rows)[None], targets[None], IGNORE_INDEX, entropy[0])
    return logp[0], None if ent is None else ent[0]


def chunk_count(targets: torch.Tensor, chunk_size: int, ignore_index: int = IGNORE_INDEX) -> int:
    """How many head calls :func:`head_token_logprobs` makes for ``targets`` (at least 1)."""
    return max(1, -(-int((targets != ignore_index).sum()) // chunk_size))


def _check_inputs(hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> None:
    """Raise ``ValueError`` unless ``hidden`` is ``[B, T, H]``, ``targets`` ``[B, T]`` and ``chunk_size >= 1``."""
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be [B, T, H] and targets [B, T]; got {tuple(hidden.shape)}, {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")


def _padding_calls(head: Head, row: torch.Tensor, target: torch.Tensor, count: int) -> Optional[torch.Tensor]:
    """``count`` head calls on the ``[1, H]`` ``row`` as one 0-dim tensor to add times 0 (``None`` for none)."""
    if count <= 0:
        return None
    target = torch.zeros_like(target)  # any valid id: the result is multiplied by 0
    calls = [checkpoint(_head_chunk, head, row, target, [False], use_reentrant=False)[0].sum() for _ in range(count)]
    return torch.stack(calls).sum()


def _scatter(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[N]`` float32 ``values`` into a ``[B, T]`` tensor of zeros, at the ``N`` positions ``keep`` marks.

    Scattered straight into ``[B, T]`` (row-major, the order ``keep`` picked them in): a reshaped
    view returned from an FSDP2 module's forward would make FSDP warn that in-place use drops its hook.
    """
    return values.new_zeros(keep.shape).masked_scatter(keep, values)


def head_token_logprobs(
    head: Head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int,
    entropy: bool = False,
    chunks: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``[B, T, H]`` hidden states and aligned ``[B, T]`` targets -> ``[B, T]`` float32 log-probs.

    Equal to ``token_logprobs(head(hidden), targets)`` (ignored positions give 0) without ever
    holding more than one ``[chunk_size, V]`` chunk of logits. With ``entropy`` also returns the
    ``[B, T]`` float32 predictive entropy in nats (no gradient; 0 at ignored positions), computed in
    the same pass and skipped when the backward recomputes the chunks; otherwise ``None``.

    ``chunks`` pads the number of head calls to that many (surplus calls run on one row and add
    exactly 0): sharded engines all-gather the head's parameters at every call, so every rank
    must make the same number. One call is always made, so that the head stays in the autograd
    graph (zero gradient) when no position has a target.
    """
    _check_inputs(hidden, targets, chunk_size)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    keep = flat_targets != ignore_index
    rows, picked = flat_hidden[keep], flat_targets[keep]  # prompt and padding never reach the head
    want_entropy = [entropy]
    pieces = [
        checkpoint(
            _head_chunk,
            head,
            rows[start : start + chunk_size],
            picked[start : start + chunk_size],
            want_entropy,
            use_reentrant=False,
        )
        for start in range(0, picked.numel(), chunk_size)
    ]
    padding = _padding_calls(head, flat_hidden[:1], flat_targets[:1], max(chunks or 0, 1) - len(pieces))
    want_entropy[0] = False  # the backward's recomputation needs the log-probs only
    values = torch.cat([p[0] for p in pieces]) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    keep = keep.reshape(targets.shape)
    logp = _scatter(values, keep)
    if padding is not None:
        logp = logp + 0.0 * padding
    if not entropy:
        return logp, None
    ent_values = torch.cat([p[1] for p in pieces]) if pieces else values.detach()
    return logp, _scatter(ent_values.detach(), keep)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``[B, T, H]`` hidden states, ``[V, H]`` LM-head weight, aligned ``[B, T]`` targets -> ``[B, T]`` float32.

    Equal to ``token_logprobs(hidden @ weight.T + bias, targets)``; peak extra memory grows with
    ``chunk_size * V``, not ``B * T * V``.
    """
    return head_token_logprobs(
        lambda rows: F.linear(rows, weight, bias), hidden, targets, chunk_size=chunk_size, ignore_index=ignore_index
    )[0]
