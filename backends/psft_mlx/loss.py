"""MLX implementation of the objectives (docs/objective.md sections 1, 3 and 4): PSFT, CE and DFT.

Shapes: ``B`` sequences, ``T`` positions, ``V`` vocabulary entries. Log-probs are float32 nats.
Everything here is a pure function of its inputs, so it can be traced by ``mx.compile`` with
old log-probs passed as arguments (never captured).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from psft_plugin.spec import EPSILON_HIGH, EPSILON_LOW, IGNORE_INDEX, LOG_RATIO_CLAMP, check_hyperparameters


def token_logprobs(logits: mx.array, targets: mx.array, ignore_index: int = IGNORE_INDEX) -> mx.array:
    """``[B, T, V]`` logits and aligned ``[B, T]`` targets -> ``[B, T]`` float32 log-probs.

    logsumexp + gather: no second ``[B, T, V]`` array is kept for the backward pass.
    Ignored positions give 0.
    """
    if logits.ndim != 3 or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"logits must be [B, T, V] and targets [B, T]; got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    logits = logits.astype(mx.float32)
    ignored = targets == ignore_index
    safe = mx.where(ignored, 0, targets).astype(mx.int32)
    picked = mx.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return mx.where(ignored, 0.0, picked - mx.logsumexp(logits, axis=-1))


def token_entropy(logits: mx.array) -> mx.array:
    """Entropy in nats of each position's predictive distribution: ``[B, T, V] -> [B, T]`` float32."""
    logits = mx.stop_gradient(logits.astype(mx.float32))
    logz = mx.logsumexp(logits, axis=-1, keepdims=True)
    return (logz - (mx.softmax(logits, axis=-1) * logits).sum(-1, keepdims=True))[..., 0]


def aggregate_weights(mask: mx.array, agg: str, num_tokens: Optional[float]) -> mx.array:
    """Per-token weights whose dot product with the token losses is the aggregated loss.

    Same definition as :func:`psft_plugin.spec.aggregate_weights`: ``num_tokens`` overrides the
    final denominator (tokens for ``token-mean``, non-empty sequences otherwise); a zero
    denominator gives zero weights.
    """
    if agg == "token-mean":
        denom = mask.sum() if num_tokens is None else mx.array(float(num_tokens))
        return mask / mx.maximum(denom, 1e-30) * (denom > 0)
    row_tokens = mask.sum(axis=1, keepdims=True)
    rows = (row_tokens > 0).sum() if num_tokens is None else mx.array(float(num_tokens))
    per_row = mask / mx.maximum(row_tokens, 1.0) if agg == "seq-mean-token-mean" else mask
    return per_row / mx.maximum(rows, 1e-30) * (rows > 0)


def _check_shapes(logp: mx.array, **others: Optional[mx.array]) -> None:
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T]; got shape {tuple(logp.shape)}")
    for name, value in others.items():
        if value is not None and tuple(value.shape) != tuple(logp.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected logp's shape {tuple(logp.shape)}")


def psft_loss(
    logp: mx.array,
    old_logp: mx.array,
    mask: mx.array,
    *,
    epsilon_low: float = EPSILON_LOW,
    epsilon_high: float = EPSILON_HIGH,
    advantages: Optional[mx.array] = None,
    agg: str = "token-mean",
    num_tokens: Optional[float] = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """PSFT loss (scalar, differentiable in ``logp``) and metrics with no gradient.

    ``logp``, ``old_logp``, ``mask`` and ``advantages`` are ``[B, T]``; ``old_logp`` gets no
    gradient. Metrics are means over this call's response tokens (``tokens`` is their count).
    """
    check_hyperparameters(epsilon_low, epsilon_high, agg, num_tokens)
    _check_shapes(logp, old_logp=old_logp, mask=mask, advantages=advantages)
    mask = mask.astype(mx.float32)
    adv = mx.ones_like(logp) if advantages is None else advantages.astype(mx.float32)
    old_logp = mx.stop_gradient(old_logp)
    ratio = mx.exp(mx.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * mx.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = (aggregate_weights(mask, agg, num_tokens) * mx.maximum(unclipped, clipped)).sum()
    clip_binds = mx.stop_gradient(clipped > unclipped)
    return loss, _metrics(mask, mx.stop_gradient(ratio), clip_binds, mx.stop_gradient(logp), old_logp)


def _metrics(mask, ratio, clip_binds, logp, old_logp) -> dict[str, mx.array]:
    tokens = mask.sum()
    denom = mx.maximum(tokens, 1.0)
    on = mask > 0
    some = tokens > 0
    return {
        "clipfrac": (clip_binds * mask).sum() / denom,
        "ratio_mean": mx.where(some, (ratio * mask).sum() / denom, 1.0),
        "ratio_min": mx.where(some, mx.where(on, ratio, mx.inf).min(), 1.0),
        "ratio_max": mx.where(some, mx.where(on, ratio, -mx.inf).max(), 1.0),
        "approx_kl": ((old_logp - logp) * mask).sum() / denom,
        "nll": (-logp * mask).sum() / denom,
        "tokens": tokens,
    }


def ce_loss(
    logp: mx.array,
    old_logp: Optional[mx.array],
    mask: mx.array,
    *,
    agg: str = "token-mean",
    num_tokens: Optional[float] = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Plain cross-entropy ``-logp`` aggregated like PSFT; ``old_logp`` is ignored."""
    check_hyperparameters(0.0, 0.0, agg, num_tokens)
    _check_shapes(logp, mask=mask)
    mask = mask.astype(mx.float32)
    tokens = mask.sum()
    loss = (aggregate_weights(mask, agg, num_tokens) * -logp).sum()
    return loss, {"nll": (mx.stop_gradient(-logp) * mask).sum() / mx.maximum(tokens, 1.0), "tokens": tokens}


def dft_loss(
    logp: mx.array,
    old_logp: Optional[mx.array],
    mask: mx.array,
    *,
    agg: str = "token-mean",
    num_tokens: Optional[float] = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Dynamic Fine-Tuning: ``-stopgrad(exp(logp)) * logp`` per token, aggregated like PSFT; ``old_logp`` is ignored.

    ``logp`` and ``mask`` are ``[B, T]``. Metrics (no gradient, over this call's response tokens):
    ``nll`` (mean ``-logp``), ``weight_mean`` (mean token weight ``exp(logp)``) and ``tokens``.
    """
    check_hyperparameters(0.0, 0.0, agg, num_tokens)
    _check_shapes(logp, mask=mask)
    mask = mask.astype(mx.float32)
    tokens = mask.sum()
    prob = mx.exp(mx.stop_gradient(logp))
    loss = (aggregate_weights(mask, agg, num_tokens) * -prob * logp).sum()
    denom = mx.maximum(tokens, 1.0)
    return loss, {
        "nll": (mx.stop_gradient(-logp) * mask).sum() / denom,
        "weight_mean": (prob * mask).sum() / denom,
        "tokens": tokens,
    }
