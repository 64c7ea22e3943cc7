"""PyTorch implementation of the objectives (docs/objective.md sections 1, 3 and 4): PSFT, CE and DFT.

Shapes: ``B`` sequences, ``T`` positions, ``V`` vocabulary entries. Log-probs are float32 nats.
"""

from __future__ import annotations

from typing import Optional

import torch

from psft_plugin.spec import EPSILON_HIGH, EPSILON_LOW, IGNORE_INDEX, LOG_RATIO_CLAMP, check_hyperparameters

# Rows of [*, V] logits reduced per logsumexp call: bounds the forward's temporary to
# about 64 MiB of float32 whatever B * T is.
_LSE_CHUNK_ELEMENTS = 1 << 24


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(logits)[target] with a hand-written backward, and optionally the entropy.

    Autograd of logsumexp + gather keeps ~3 extra ``[B, T, V]`` temporaries alive in backward
    (measured: 4x the logits' size at peak, log_softmax 3x). Here the forward's only
    ``[B, T, V]``-sized temporaries are per-chunk, and the backward builds the gradient
    ``g * (onehot - softmax)`` in place in one new tensor: peak 2x the logits. The entropy
    (no gradient) reuses each chunk's logsumexp, so it costs one more pass over the chunk.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, with_entropy: bool = False):
        flat = logits.reshape(-1, logits.shape[-1])
        rows = max(1, _LSE_CHUNK_ELEMENTS // flat.shape[-1])
        lse, entropy = [], []
        for i in range(0, flat.shape[0], rows):
            block = flat[i : i + rows].float()
            lse.append(torch.logsumexp(block, dim=-1))
            if with_entropy:  # H = lse - sum(p * z)
                entropy.append(lse[-1] - (block - lse[-1].unsqueeze(-1)).exp_().mul_(block).sum(-1))
        lse = torch.cat(lse).reshape(targets.shape)
        ignored = targets == ignore_index
        safe = targets.masked_fill(ignored, 0)
        picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
        ctx.save_for_backward(logits, lse, safe, ignored)
        entropy = torch.cat(entropy).reshape(targets.shape).masked_fill(ignored, 0.0) if with_entropy else None
        ctx.mark_non_differentiable(*([entropy] if with_entropy else []))
        return (picked - lse).masked_fill(ignored, 0.0), entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor] = None):
        logits, lse, safe, ignored = ctx.saved_tensors
        g = grad_logp.masked_fill(ignored, 0.0).unsqueeze(-1)
        grad = torch.sub(logits.float(), lse.unsqueeze(-1)).exp_().mul_(-g)
        grad.scatter_add_(-1, safe.unsqueeze(-1), g)
        return grad.to(logits.dtype), None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[B, T, V]`` logits and aligned ``[B, T]`` targets -> ``[B, T]`` float32 log-probs.

    Computed in float32 whatever the logits' dtype. Autograd keeps only the logits and
    ``[B, T]`` tensors (no log_softmax copy), and the backward peaks at one gradient-sized
    tensor. Ignored positions give 0.
    """
    return token_logprobs_and_entropy(logits, targets, ignore_index, entropy=False)[0]


def token_logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, entropy: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`token_logprobs` plus, with ``entropy``, each position's predictive entropy in one pass.

    Returns ``([B, T] float32 log-probs, [B, T] float32 entropy in nats or None)``; the entropy has
    no gradient and is 0 at ignored positions.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and targets [B, T]; got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    return _TokenLogprobs.apply(logits, targets, ignore_index, entropy)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each position's predictive distribution: ``[B, T, V] -> [B, T]`` float32."""
    logits = logits.float()
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    return (logz - (torch.softmax(logits, dim=-1) * logits).sum(-1, keepdim=True)).squeeze(-1)


def aggregate_weights(mask: torch.Tensor, agg: str, num_tokens: Optional[float]) -> torch.Tensor:
    """Per-token weights whose dot product with the token losses is the aggregated loss.

    Same definition as :func:`psft_plugin.spec.aggregate_weights`: ``num_tokens`` overrides the
    final denominator (tokens for ``token-mean``, non-empty sequences otherwise); a zero
    denominator gives zero weights.
    """
    if agg == "token-mean":
        denom = mask.sum() if num_tokens is None else torch.as_tensor(float(num_tokens), device=mask.device)
        return mask / denom.clamp(min=1e-30) * (denom > 0)
    row_tokens = mask.sum(dim=1, keepdim=True)
    rows = (row_tokens > 0).sum() if num_tokens is None else torch.as_tensor(float(num_tokens), device=mask.device)
    per_row = mask / row_tokens.clamp(min=1.0) if agg == "seq-mean-token-mean" else mask
    return per_row / rows.clamp(min=1e-30) * (rows > 0)


def _check_shapes(logp: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T]; got shape {tuple(logp.shape)}")
    for name, value in others.items():
        if value is not None and value.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected logp's shape {tuple(logp.shape)}")


def psft_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = EPSILON_LOW,
    epsilon_high: float = EPSILON_HIGH,
    advantages: Optional[torch.Tensor] = None,
    agg: str = "token-mean",
    num_tokens: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PSFT loss (0-dim, differentiable in ``logp``) and detached metrics.

    ``logp``, ``old_logp``, ``mask`` and ``advantages`` are ``[B, T]``; ``old_logp`` gets no
    gradient. Metrics are means over this call's response tokens (``tokens`` is their count).
    """
    check_hyperparameters(epsilon_low, epsilon_high, agg, num_tokens)
    _check_shapes(logp, old_logp=old_logp, mask=mask, advantages=advantages)
    mask = mask.to(logp.dtype)
    adv = torch.ones_like(logp) if advantages is None else advantages.to(logp.dtype)
    ratio = torch.exp(torch.clamp(logp - old_logp.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = (aggregate_weights(mask, agg, num_tokens) * torch.maximum(unclipped, clipped)).sum()
    return loss, _metrics(mask, ratio.detach(), clipped.detach() > unclipped.detach(), logp.detach(), old_logp.detach())


def _metrics(mask, ratio, clip_binds, logp, old_logp) -> dict[str, torch.Tensor]:
    tokens = mask.sum()
    denom = tokens.clamp(min=1.0)
    on = mask > 0
    one = torch.ones((), device=mask.device)
    return {
        "clipfrac": (clip_binds * mask).sum() / denom,
        "ratio_mean": torch.where(tokens > 0, (ratio * mask).sum() / denom, one),
        "ratio_min": torch.where(on, ratio, torch.full_like(ratio, float("inf"))).amin().where(tokens > 0, one),
        "ratio_max": torch.where(on, ratio, torch.full_like(ratio, float("-inf"))).amax().where(tokens > 0, one),
        "approx_kl": ((old_logp - logp) * mask).sum() / denom,
        "nll": (-logp * mask).sum() / denom,
        "tokens": tokens,
    }


def psft_ce_weights(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    *,
    epsilon_low: float = EPSILON_LOW,
    epsilon_high: float = EPSILON_HIGH,
    advantages: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Detached ``[B, T]`` weights ``w`` with ``grad(sum(c * w * ce)) == grad(psft_loss)``.

    ``ce = -logp`` per token and ``c`` the aggregation weights. This is the weighted-CE form of
    docs/objective.md section 1: any kernel returning per-token CE with gradient can train PSFT.
    """
    logp, old_logp = logp.detach(), old_logp.detach()
    adv = torch.ones_like(logp) if advantages is None else advantages.to(logp.dtype)
    raw = logp - old_logp
    ratio = torch.exp(raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clip_binds = -adv * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high) > -adv * ratio
    active = ~clip_binds & (raw.abs() <= LOG_RATIO_CLAMP)
    return adv * ratio * active


def ce_loss(
    logp: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    agg: str = "token-mean",
    num_tokens: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain cross-entropy ``-logp`` aggregated like PSFT; ``old_logp`` is ignored."""
    check_hyperparameters(0.0, 0.0, agg, num_tokens)
    _check_shapes(logp, mask=mask)
    mask = mask.to(logp.dtype)
    tokens = mask.sum()
    loss = (aggregate_weights(mask, agg, num_tokens) * -logp).sum()
    return loss, {"nll": (-logp.detach() * mask).sum() / tokens.clamp(min=1.0), "tokens": tokens}


def dft_loss(
    logp: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    agg: str = "token-mean",
    num_tokens: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dynamic Fine-Tuning: ``-stopgrad(exp(logp)) * logp`` per token, aggregated like PSFT; ``old_logp`` is ignored.

    ``logp`` and ``mask`` are ``[B, T]``. Metrics (detached, over this call's response tokens):
    ``nll`` (mean ``-logp``), ``weight_mean`` (mean token weight ``exp(logp)``) and ``tokens``.
    """
    check_hyperparameters(0.0, 0.0, agg, num_tokens)
    _check_shapes(logp, mask=mask)
    mask = mask.to(logp.dtype)
    tokens = mask.sum()
    prob = logp.detach().exp()
    loss = (aggregate_weights(mask, agg, num_tokens) * -prob * logp).sum()
    denom = tokens.clamp(min=1.0)
    return loss, {
        "nll": (-logp.detach() * mask).sum() / denom,
        "weight_mean": (prob * mask).sum() / denom,
        "tokens": tokens,
    }
