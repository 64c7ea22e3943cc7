"""Our torch DFT against TRL's own ``dft_loss`` (``trl.trainer.sft_trainer``) on the same logits and labels.

TRL takes the model output and the unshifted ``labels`` and divides the summed per-token loss by
``num_items_in_batch`` (the optimizer step's response tokens, what the host passes), or by this
batch's own count when it is ``None``. Ours: :func:`psft_torch.trainer.aligned_targets` shifts the
labels, :func:`psft_torch.token_logprobs` gives float32 log-probs, and ``dft_loss(..., num_tokens=)``
takes the same denominator. Measured on this machine (5 seeds): float32 logits give a bitwise equal
logits-gradient and loss (1.1e-7 relative on the loss with ``num_items_in_batch``: the division is
ordered differently); float64 logits (ours computes in float32, TRL in float64) differ by 1.9e-7 on
the loss and 3.3e-7 on the gradient (relative to its largest entry). The bound is float32
rounding, 1e-6.
"""

import types

import pytest
import torch
from trl.trainer.sft_trainer import dft_loss as trl_dft_loss

import psft_torch
from psft_torch.trainer import IGNORE_INDEX, aligned_targets

TOLERANCE = 1e-6


def _batch(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, 17, 101]`` logits of scale 3 and ragged labels: a masked prompt, padding, holes."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 17, 101, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, 101, (3, 17), generator=generator)
    labels[0, :5] = IGNORE_INDEX
    labels[1, 10:] = IGNORE_INDEX
    labels[2, ::3] = IGNORE_INDEX
    return logits, labels


def _trl(logits, labels, num_items):
    logits = logits.clone().requires_grad_(True)
    loss = trl_dft_loss(types.SimpleNamespace(logits=logits), labels.clone(), num_items_in_batch=num_items)
    loss.backward()
    return loss.item(), logits.grad


def _ours(logits, labels, num_items):
    logits = logits.clone().requires_grad_(True)
    targets = aligned_targets(labels)
    loss, metrics = psft_torch.dft_loss(
        psft_torch.token_logprobs(logits, targets), None, targets != IGNORE_INDEX, num_tokens=num_items
    )
    loss.backward()
    return loss.item(), logits.grad, metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("step_tokens", [False, True], ids=["own-count", "num_items_in_batch"])
def test_dft_loss_and_gradient_equal_trls(dtype, step_tokens):
    worst_loss = worst_grad = 0.0
    for seed in range(5):
        logits, labels = _batch(seed, dtype)
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        num_items = 3 * tokens if step_tokens else None  # as if two more micro-batches shared the step
        expected, expected_grad = _trl(logits, labels, num_items)
        loss, grad, metrics = _ours(logits, labels, num_items)
        assert metrics["tokens"].item() == tokens and expected_grad.abs().max() > 0
        worst_loss = max(worst_loss, abs(loss - expected) / abs(expected))
        worst_grad = max(worst_grad, ((grad - expected_grad).abs().max() / expected_grad.abs().max()).item())
    print(
        f"DFT vs TRL ({dtype}, num_items_in_batch={'step' if step_tokens else 'None'}): "
        f"loss rel {worst_loss:.2e}, grad rel {worst_grad:.2e}"
    )
    assert worst_loss <= TOLERANCE and worst_grad <= TOLERANCE


def test_dft_differs_from_trls_cross_entropy_so_the_comparison_can_fail():
    """The same comparison against plain CE fails by far more than the tolerance."""
    logits, labels = _batch(0, torch.float32)
    expected, _ = _trl(logits, labels, None)
    targets = aligned_targets(labels)
    ce, _ = psft_torch.ce_loss(psft_torch.token_logprobs(logits, targets), None, targets != IGNORE_INDEX)
    assert abs(ce.item() - expected) / abs(expected) > 100 * TOLERANCE
