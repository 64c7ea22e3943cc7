"""psft_torch reproduces every shipped vector; the weighted-CE form has PSFT's gradient."""

import numpy as np
import pytest
import torch  # noqa: E402
from vectors import DFT_CASES, DFT_METRICS, LOGPROB_CASES, LOSS_CASES, METRICS, TOLERANCE, max_rel_err  # noqa: E402

import psft_torch  # noqa: E402


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c["name"])
def test_loss_gradient_and_metrics_match_the_vectors(case):
    logp = _t(case["logp"]).requires_grad_(True)
    adv = None if case["advantages"] is None else _t(case["advantages"])
    loss, metrics = psft_torch.psft_loss(logp, _t(case["old_logp"]), _t(case["mask"]), advantages=adv, **case["kwargs"])
    loss.backward()
    assert max_rel_err(loss.item(), case["loss"]) <= TOLERANCE
    assert max_rel_err(logp.grad.numpy(), case["grad"]) <= TOLERANCE
    for name in METRICS:
        assert max_rel_err(metrics[name].item(), case["metrics"][name]) <= TOLERANCE, name


@pytest.mark.parametrize("case", DFT_CASES, ids=lambda c: c["name"])
def test_dft_loss_gradient_and_metrics_match_the_vectors(case):
    logp = _t(case["logp"]).requires_grad_(True)
    loss, metrics = psft_torch.dft_loss(logp, None, _t(case["mask"]), **case["kwargs"])
    loss.backward()
    assert max_rel_err(loss.item(), case["loss"]) <= TOLERANCE
    assert max_rel_err(logp.grad.numpy(), case["grad"]) <= TOLERANCE
    assert set(metrics) == set(DFT_METRICS)
    for name in DFT_METRICS:
        assert max_rel_err(metrics[name].item(), case["metrics"][name]) <= TOLERANCE, name


@pytest.mark.parametrize("case", LOGPROB_CASES, ids=lambda c: c["name"])
def test_token_logprobs_match_the_vectors(case):
    logp = psft_torch.token_logprobs(_t(case["logits"]), torch.tensor(case["targets"]), case["ignore_index"])
    assert logp.dtype == torch.float32
    assert max_rel_err(logp.numpy(), case["logp"]) <= TOLERANCE


def test_weighted_ce_form_has_the_same_gradient():
    case = next(c for c in LOSS_CASES if c["name"] == "both_clip_edges_mixed_adv")
    adv, old, mask = _t(case["advantages"]), _t(case["old_logp"]), _t(case["mask"])
    direct = _t(case["logp"]).requires_grad_(True)
    psft_torch.psft_loss(direct, old, mask, advantages=adv)[0].backward()
    weighted = _t(case["logp"]).requires_grad_(True)
    w = psft_torch.psft_ce_weights(weighted, old, advantages=adv)
    c = psft_torch.aggregate_weights(mask, "token-mean", None)
    (c * w * -weighted).sum().backward()
    assert direct.grad.abs().sum() > 0 and (w == 0).any()
    torch.testing.assert_close(weighted.grad, direct.grad, rtol=0, atol=1e-7)


def test_token_logprobs_gradient_keeps_no_second_full_tensor():
    """Autograd saves only the logits and [B, T] tensors, not a second [B, T, V] float32 one."""
    logits = torch.randn(2, 8, 1000, requires_grad=True)
    targets = torch.randint(0, 1000, (2, 8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        psft_torch.token_logprobs(logits, targets).sum().backward()
    big = [t for t in saved if t.numel() >= logits.numel() and t.data_ptr() != logits.data_ptr()]
    assert big == []
    np.testing.assert_allclose(
        psft_torch.token_logprobs(logits, targets).detach().numpy(),
        torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0].detach().numpy(),
        atol=1e-5,
    )


def test_entropy_and_ce_loss():
    logits = torch.randn(2, 3, 5)
    from psft_plugin.spec import token_entropy

    np.testing.assert_allclose(psft_torch.token_entropy(logits).numpy(), token_entropy(logits.numpy()), atol=1e-6)
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1]]))
    loss, metrics = psft_torch.ce_loss(logp, None, torch.tensor([[1.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(-(np.log(0.5) + np.log(0.25)) / 2)
    assert metrics["nll"].item() == pytest.approx(loss.item())


@pytest.mark.parametrize("case", LOGPROB_CASES, ids=lambda c: c["name"])
def test_one_pass_logprobs_and_entropy_match_the_spec(case):
    """What the trainer's full-logits path reads: the spec's log-probs, and its entropy where a target is."""
    from psft_plugin.spec import token_entropy

    logits, targets = _t(case["logits"]), torch.tensor(case["targets"])
    logp, entropy = psft_torch.token_logprobs_and_entropy(logits, targets, case["ignore_index"])
    assert max_rel_err(logp.numpy(), case["logp"]) <= TOLERANCE
    logits_np = np.array(case["logits"])
    expected = np.where(np.array(case["targets"]) == case["ignore_index"], 0.0, token_entropy(logits_np))
    # float32 `lse - sum(p * z)` subtracts two numbers the size of the logits: the error grows with them
    # (9e-5 nats at |z| ~ 80 in `large_logits`, 2e-7 at |z| ~ 3)
    np.testing.assert_allclose(entropy.numpy(), expected, rtol=0, atol=2e-6 * np.abs(logits_np).max())
    assert psft_torch.token_logprobs_and_entropy(logits, targets, entropy=False)[1] is None


def test_token_logprobs_backward_matches_log_softmax_autograd():
    logits = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 5, -100, 2], [-100, -100, 1, 3]])
    weights = torch.randn(2, 4)
    (psft_torch.token_logprobs(logits, targets) * weights).sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    expected = torch.log_softmax(reference, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    (expected.masked_fill(targets == -100, 0) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=0, atol=1e-6)
    assert (logits.grad[1, :2] == 0).all()  # ignored positions get no gradient


def test_token_logprobs_accepts_bfloat16_and_returns_float32_gradients_in_kind():
    logits = torch.randn(1, 3, 8).bfloat16().requires_grad_(True)
    logp = psft_torch.token_logprobs(logits, torch.tensor([[1, 2, 3]]))
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
