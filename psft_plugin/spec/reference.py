"""NumPy reference of the objectives (docs/objective.md sections 1 and 3): PSFT, CE and DFT.

This module is the definition every backend is tested against. It computes in float64
internally and imports nothing but NumPy.

Shapes: ``B`` sequences of ``T`` positions over a vocabulary of ``V`` tokens.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

LOG_RATIO_CLAMP = 20.0
IGNORE_INDEX = -100
"""Target id of a position that predicts nothing (prompt, padding): transformers' label convention."""
EPSILON_LOW, EPSILON_HIGH = 0.2, 0.28
"""Default clip widths: the ratio is clipped to ``[1 - EPSILON_LOW, 1 + EPSILON_HIGH]``."""
EPSILON_LOW_RANGE = (0.0, 1.0)
"""``epsilon_low`` lies in ``[0, 1)``, so that the ratio floor ``1 - epsilon_low`` stays positive."""
EPSILON_HIGH_MIN = 0.0
"""``epsilon_high`` is at least 0, so that the ratio ceiling ``1 + epsilon_high`` is at least 1."""
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def token_logprobs(logits: np.ndarray, targets: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Log-probability of each target token.

    Args:
        logits: ``[B, T, V]`` unnormalised scores; ``logits[:, t]`` predicts ``targets[:, t]``.
        targets: ``[B, T]`` integer token ids, ``ignore_index`` where nothing is predicted.
        ignore_index: target value whose positions get log-prob 0.

    Returns:
        ``[B, T]`` float32 log-probabilities (natural log), 0 at ignored positions.
    """
    logits = np.asarray(logits)
    targets = np.asarray(targets)
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and targets [B, T]; got logits {logits.shape}, targets {targets.shape}"
        )
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or infinite values")
    ignored = targets == ignore_index
    safe = np.where(ignored, 0, targets).astype(np.int64)
    if safe.min(initial=0) < 0 or safe.max(initial=0) >= logits.shape[-1]:
        raise ValueError(f"targets must be in [0, {logits.shape[-1]}) or equal ignore_index={ignore_index}")
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    return np.where(ignored, 0.0, picked - lse).astype(np.float32)


def token_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the predictive distribution at each position: ``[B, T, V] -> [B, T]``."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1, keepdims=True))
    logp = x - logz
    return -(np.exp(logp) * logp).sum(axis=-1).astype(np.float32)


def _check_inputs(logp, old_logp, mask, advantages, epsilon_low, epsilon_high, agg, num_tokens):
    logp, old_logp, mask = (np.asarray(a, dtype=np.float64) for a in (logp, old_logp, mask))
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T]; got shape {logp.shape}")
    for name, value in (("old_logp", old_logp), ("mask", mask)):
        if value.shape != logp.shape:
            raise ValueError(f"{name} has shape {value.shape}, expected logp's shape {logp.shape}")
    if advantages is None:
        advantages = np.ones_like(logp)
    advantages = np.asarray(advantages, dtype=np.float64)
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages has shape {advantages.shape}, expected logp's shape {logp.shape}")
    for name, value in (("logp", logp), ("old_logp", old_logp), ("mask", mask), ("advantages", advantages)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contains NaN or infinite values")
    check_hyperparameters(epsilon_low, epsilon_high, agg, num_tokens)
    return logp, old_logp, mask, advantages


def check_hyperparameters(epsilon_low: float, epsilon_high: float, agg: str, num_tokens) -> None:
    """Raise ``ValueError`` naming the argument when a PSFT hyper-parameter is out of range."""
    low, high = EPSILON_LOW_RANGE
    if not low <= epsilon_low < high:
        raise ValueError(
            f"epsilon_low={epsilon_low} must be in [{low:g}, {high:g}) (the ratio is clipped at 1 - epsilon_low)"
        )
    if not epsilon_high >= EPSILON_HIGH_MIN:
        raise ValueError(
            f"epsilon_high={epsilon_high} must be >= {EPSILON_HIGH_MIN:g} (the ratio is clipped at 1 + epsilon_high)"
        )
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg={agg!r} is not one of {', '.join(AGGREGATIONS)}")
    if num_tokens is not None and not num_tokens >= 0:
        raise ValueError(f"num_tokens={num_tokens} must be >= 0 (the denominator of the mean)")


def aggregate_weights(mask: np.ndarray, agg: str, num_tokens: Optional[float]) -> np.ndarray:
    """Per-token weights ``c_t`` such that the aggregated loss is ``sum_t c_t * loss_t``.

    ``num_tokens`` overrides the final denominator: the number of response tokens for
    ``token-mean``, the number of non-empty sequences for the ``seq-mean-*`` modes (pass the
    whole optimizer step's count when the step spans several micro-batches). A zero
    denominator gives zero weights, never NaN.
    """
    if agg == "token-mean":
        denom = mask.sum() if num_tokens is None else float(num_tokens)
        return mask / denom if denom > 0 else np.zeros_like(mask)
    row_tokens = mask.sum(axis=1, keepdims=True)
    nonempty = float((row_tokens[:, 0] > 0).sum()) if num_tokens is None else float(num_tokens)
    if nonempty == 0:
        return np.zeros_like(mask)
    if agg == "seq-mean-token-mean":
        per_row = np.divide(mask, row_tokens, out=np.zeros_like(mask), where=row_tokens > 0)
        return per_row / nonempty
    return mask / nonempty  # seq-mean-token-sum


def psft_loss_and_grad(
    logp,
    old_logp,
    mask,
    *,
    epsilon_low: float = EPSILON_LOW,
    epsilon_high: float = EPSILON_HIGH,
    advantages=None,
    agg: str = "token-mean",
    num_tokens: Optional[float] = None,
) -> tuple[float, np.ndarray, dict[str, float]]:
    """PSFT loss, its analytic gradient with respect to ``logp``, and the metrics.

    Args:
        logp: ``[B, T]`` current-policy log-probs of the response tokens (nats).
        old_logp: ``[B, T]`` log-probs of the same tokens under the old policy.
        mask: ``[B, T]`` 1 for response tokens, 0 for prompt and padding.
        epsilon_low, epsilon_high: the ratio is clipped to ``[1 - epsilon_low, 1 + epsilon_high]``.
        advantages: ``[B, T]`` per-token advantages; all ones (PSFT) when ``None``.
        agg: one of :data:`AGGREGATIONS`.
        num_tokens: denominator override, see :func:`aggregate_weights`.

    Returns:
        ``(loss, d loss / d logp as [B, T] float64, metrics)``. Metrics are means over the
        response tokens of this call (``tokens`` is their count).
    """
    logp, old_logp, mask, adv = _check_inputs(
        logp, old_logp, mask, advantages, epsilon_low, epsilon_high, agg, num_tokens
    )
    raw_log_ratio = logp - old_logp
    log_ratio = np.clip(raw_log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = np.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * np.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    token_loss = np.maximum(unclipped, clipped)
    clip_binds = clipped > unclipped
    inside_clamp = np.abs(raw_log_ratio) < LOG_RATIO_CLAMP
    weights = aggregate_weights(mask, agg, num_tokens)
    loss = float((weights * token_loss).sum())
    grad = weights * np.where(clip_binds | ~inside_clamp, 0.0, -adv * ratio)
    return loss, grad, _metrics(mask, ratio, clip_binds, logp, old_logp)


def _metrics(mask, ratio, clip_binds, logp, old_logp) -> dict[str, float]:
    tokens = float(mask.sum())
    if tokens == 0:
        return {
            "clipfrac": 0.0,
            "ratio_mean": 1.0,
            "ratio_min": 1.0,
            "ratio_max": 1.0,
            "approx_kl": 0.0,
            "nll": 0.0,
            "tokens": 0.0,
        }
    on = mask > 0
    return {
        "clipfrac": float((clip_binds * mask).sum() / tokens),
        "ratio_mean": float((ratio * mask).sum() / tokens),
        "ratio_min": float(ratio[on].min()),
        "ratio_max": float(ratio[on].max()),
        "approx_kl": float(((old_logp - logp) * mask).sum() / tokens),
        "nll": float((-logp * mask).sum() / tokens),
        "tokens": tokens,
    }


def psft_loss(logp, old_logp, mask, **kwargs) -> tuple[float, dict[str, float]]:
    """PSFT loss and metrics (the backend contract); see :func:`psft_loss_and_grad`."""
    loss, _, metrics = psft_loss_and_grad(logp, old_logp, mask, **kwargs)
    return loss, metrics


def ce_loss(logp, old_logp, mask, *, agg: str = "token-mean", num_tokens=None) -> tuple[float, dict[str, float]]:
    """Plain cross-entropy ``-logp`` aggregated like PSFT; ``old_logp`` is ignored (may be None)."""
    logp, mask = np.asarray(logp, dtype=np.float64), np.asarray(mask, dtype=np.float64)
    check_hyperparameters(0.0, 0.0, agg, num_tokens)
    tokens = float(mask.sum())
    nll = float((-logp * mask).sum() / tokens) if tokens else 0.0
    return float((aggregate_weights(mask, agg, num_tokens) * -logp).sum()), {"nll": nll, "tokens": tokens}


def dft_loss_and_grad(
    logp, old_logp, mask, *, agg: str = "token-mean", num_tokens: Optional[float] = None
) -> tuple[float, np.ndarray, dict[str, float]]:
    """Dynamic Fine-Tuning (Wu et al., arXiv 2508.05629): its loss, gradient in ``logp`` and metrics.

    Per response token the loss is ``-stopgrad(p) * logp`` with ``p = exp(logp)``: cross-entropy
    with each token's gradient scaled by its own (detached) probability. Aggregated over the
    optimizer step like PSFT and CE (:func:`aggregate_weights`). No old policy: ``old_logp`` is
    ignored (may be None).

    Args:
        logp: ``[B, T]`` current-policy log-probs of the response tokens (nats).
        old_logp: unused.
        mask: ``[B, T]`` 1 for response tokens, 0 for prompt and padding.
        agg: one of :data:`AGGREGATIONS`.
        num_tokens: denominator override, see :func:`aggregate_weights`.

    Returns:
        ``(loss, d loss / d logp as [B, T] float64, metrics)``: ``nll`` (mean ``-logp``),
        ``weight_mean`` (mean token weight ``p``, 0 without tokens) and ``tokens``, means over
        this call's response tokens.
    """
    logp, mask = np.asarray(logp, dtype=np.float64), np.asarray(mask, dtype=np.float64)
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T]; got shape {logp.shape}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask has shape {mask.shape}, expected logp's shape {logp.shape}")
    for name, value in (("logp", logp), ("mask", mask)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contains NaN or infinite values")
    check_hyperparameters(0.0, 0.0, agg, num_tokens)
    weights = aggregate_weights(mask, agg, num_tokens)
    prob = np.exp(logp)
    loss = float((weights * -prob * logp).sum())
    tokens = float(mask.sum())
    metrics = {
        "nll": float((-logp * mask).sum() / tokens) if tokens else 0.0,
        "weight_mean": float((prob * mask).sum() / tokens) if tokens else 0.0,
        "tokens": tokens,
    }
    return loss, weights * -prob, metrics


def dft_loss(logp, old_logp, mask, **kwargs) -> tuple[float, dict[str, float]]:
    """DFT loss and metrics (the backend contract); see :func:`dft_loss_and_grad`."""
    loss, _, metrics = dft_loss_and_grad(logp, old_logp, mask, **kwargs)
    return loss, metrics
