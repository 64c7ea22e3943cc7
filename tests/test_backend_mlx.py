"""psft_mlx reproduces every shipped vector; the weighted-CE form has PSFT's gradient."""

import mlx.core as mx  # noqa: E402
import numpy as np
import pytest
from vectors import DFT_CASES, DFT_METRICS, LOGPROB_CASES, LOSS_CASES, METRICS, TOLERANCE, max_rel_err  # noqa: E402

import psft_mlx  # noqa: E402


def _a(values):
    return mx.array(np.asarray(values, dtype=np.float32))


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c["name"])
def test_loss_gradient_and_metrics_match_the_vectors(case):
    adv = None if case["advantages"] is None else _a(case["advantages"])
    old, mask = _a(case["old_logp"]), _a(case["mask"])

    def loss_only(logp):
        return psft_mlx.psft_loss(logp, old, mask, advantages=adv, **case["kwargs"])[0]

    logp = _a(case["logp"])
    loss, grad = mx.value_and_grad(loss_only)(logp)
    _, metrics = psft_mlx.psft_loss(logp, old, mask, advantages=adv, **case["kwargs"])
    assert max_rel_err(loss.item(), case["loss"]) <= TOLERANCE
    assert max_rel_err(np.array(grad), case["grad"]) <= TOLERANCE
    for name in METRICS:
        assert max_rel_err(metrics[name].item(), case["metrics"][name]) <= TOLERANCE, name


@pytest.mark.parametrize("case", DFT_CASES, ids=lambda c: c["name"])
def test_dft_loss_gradient_and_metrics_match_the_vectors(case):
    mask = _a(case["mask"])
    logp = _a(case["logp"])
    loss, grad = mx.value_and_grad(lambda lp: psft_mlx.dft_loss(lp, None, mask, **case["kwargs"])[0])(logp)
    _, metrics = psft_mlx.dft_loss(logp, None, mask, **case["kwargs"])
    assert max_rel_err(loss.item(), case["loss"]) <= TOLERANCE
    assert max_rel_err(np.array(grad), case["grad"]) <= TOLERANCE
    assert set(metrics) == set(DFT_METRICS)
    for name in DFT_METRICS:
        assert max_rel_err(metrics[name].item(), case["metrics"][name]) <= TOLERANCE, name


@pytest.mark.parametrize("case", LOGPROB_CASES, ids=lambda c: c["name"])
def test_token_logprobs_match_the_vectors(case):
    logp = psft_mlx.token_logprobs(_a(case["logits"]), mx.array(case["targets"]), case["ignore_index"])
    assert logp.dtype == mx.float32
    assert max_rel_err(np.array(logp), case["logp"]) <= TOLERANCE


def test_weighted_ce_form_has_the_same_gradient():
    """With w = stopgrad(A * r * active), sum(c * w * -logp) has PSFT's gradient (spec section 1)."""
    case = next(c for c in LOSS_CASES if c["name"] == "both_clip_edges_mixed_adv")
    adv, old, mask = _a(case["advantages"]), _a(case["old_logp"]), _a(case["mask"])
    logp = _a(case["logp"])
    direct = mx.grad(lambda lp: psft_mlx.psft_loss(lp, old, mask, advantages=adv)[0])(logp)
    ratio = mx.exp(logp - old)
    active = mx.logical_not(-adv * mx.clip(ratio, 0.8, 1.28) > -adv * ratio)
    w = adv * ratio * active
    c = psft_mlx.aggregate_weights(mask, "token-mean", None)
    weighted = mx.grad(lambda lp: (c * w * -lp).sum())(logp)
    assert np.abs(np.array(direct)).sum() > 0 and not np.array(active).all()
    np.testing.assert_allclose(np.array(weighted), np.array(direct), rtol=0, atol=1e-7)


def test_entropy_and_ce_loss():
    from psft_plugin.spec import token_entropy

    logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(np.array(psft_mlx.token_entropy(mx.array(logits))), token_entropy(logits), atol=1e-6)
    logp = mx.log(mx.array([[0.5, 0.25, 0.1]]))
    loss, metrics = psft_mlx.ce_loss(logp, None, mx.array([[1.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(-(np.log(0.5) + np.log(0.25)) / 2, rel=1e-6)
    assert metrics["nll"].item() == pytest.approx(loss.item())
