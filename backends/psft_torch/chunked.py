"""Log-probs straight from hidden states, a chunk of tokens at a time.

A training forward normally builds ``[B, T, V]`` logits (plus a float32 copy) before any
log-prob is taken; at long sequences and large vocabularies that dominates memory. Here the
LM head is applied to ``chunk_size`` tokens at a time and each chunk is recomputed in the
backward pass (activation checkpointing), so no more than one chunk's ``[chunk, V]`` logits
exist at once, forward or backward. The result feeds :func:`psft_torch.psft_loss` unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from psft_torch.loss import token_logprobs


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(logits[None], targets[None], ignore_index)[0]


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``[B, T, H]`` hidden states, ``[V, H]`` LM-head weight, aligned ``[B, T]`` targets -> ``[B, T]`` float32.

    Equal to ``token_logprobs(hidden @ weight.T + bias, targets)``; peak extra memory grows with
    ``chunk_size * V``, not ``B * T * V``.
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and targets [B, T]; got {tuple(hidden.shape)}, {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    pieces = [
        checkpoint(_chunk_logprobs, flat_hidden[start:start + chunk_size], weight, bias,
                   flat_targets[start:start + chunk_size], ignore_index, use_reentrant=False)
        for start in range(0, flat_targets.numel(), chunk_size)
    ]
    return torch.cat(pieces).reshape(targets.shape)
