"""Log-probs straight from hidden states, a chunk of tokens at a time.

The LM head is applied to ``chunk_size`` tokens at a time and each chunk is recomputed in the
backward pass (``mx.checkpoint``). The values and gradients equal the full path's, but on MLX
this does not lower the peak memory: the lazy graph keeps the chunks' logits alive together
(``python -m psft_plugin.bench.logprob mlx``: 1.96 vs 2.07 x one ``[T, V]`` float32 logits
tensor at T = 1024, V = 8192, chunk 128). It is kept for that comparison; the docs do not offer
it as a memory saver (use ``psft_torch.chunked``).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from psft_mlx.loss import token_logprobs
from psft_plugin.spec import IGNORE_INDEX


def chunked_token_logprobs(
    hidden: mx.array,
    weight: mx.array,
    targets: mx.array,
    *,
    bias: Optional[mx.array] = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> mx.array:
    """``[B, T, H]`` hidden states, ``[V, H]`` LM-head weight, aligned ``[B, T]`` targets -> ``[B, T]`` float32.

    Equal to ``token_logprobs(hidden @ weight.T + bias, targets)`` (see the module docstring on memory).
    """
    if hidden.ndim != 3 or tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"hidden must be [B, T, H] and targets [B, T]; got {tuple(hidden.shape)}, {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    pieces = []
    for start in range(0, flat_targets.size, chunk_size):
        chunk_targets = flat_targets[start : start + chunk_size]

        def chunk(h: mx.array, w: mx.array, chunk_targets: mx.array = chunk_targets) -> mx.array:
            logits = h @ w.T if bias is None else h @ w.T + bias
            return token_logprobs(logits[None], chunk_targets[None], ignore_index)[0]

        pieces.append(mx.checkpoint(chunk)(flat_hidden[start : start + chunk_size], weight))
    return mx.concatenate(pieces).reshape(targets.shape)
