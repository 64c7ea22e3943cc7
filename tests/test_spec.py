"""The NumPy reference: its gradient, its identities and its input validation."""

import numpy as np
import pytest

from psft_plugin import spec
from psft_plugin.spec.make_vectors import main as make_vectors_main
from psft_plugin.spec.make_vectors import stale_files


def _inputs(seed=0, shape=(3, 6), scale=0.4):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 4, size=shape)
    old = logp - rng.normal(0, scale, size=shape)
    mask = (rng.uniform(size=shape) < 0.7).astype(float)
    return logp, old, mask, rng


@pytest.mark.parametrize("agg", spec.AGGREGATIONS)
def test_analytic_gradient_matches_finite_differences(agg):
    logp, old, mask, rng = _inputs(1)
    adv = rng.choice([-1.0, 0.5, 1.0, 2.0], size=logp.shape)
    _, grad, _ = spec.psft_loss_and_grad(logp, old, mask, advantages=adv, agg=agg)
    h = 1e-6
    numeric = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        up, down = logp.copy(), logp.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (
            spec.psft_loss(up, old, mask, advantages=adv, agg=agg)[0]
            - spec.psft_loss(down, old, mask, advantages=adv, agg=agg)[0]
        ) / (2 * h)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_right_after_refresh_the_gradient_is_sfts():
    logp, _, mask, _ = _inputs(2)
    loss, grad, metrics = spec.psft_loss_and_grad(logp, logp, mask)
    ce, _ = spec.ce_loss(logp, None, mask)
    assert loss == pytest.approx(-1.0)
    np.testing.assert_allclose(grad, -mask / mask.sum())  # d(mean -logp)/d logp
    assert metrics["clipfrac"] == 0 and metrics["ratio_mean"] == 1.0
    assert metrics["nll"] == pytest.approx(ce)


def test_epsilon_low_only_acts_through_negative_advantages():
    logp, old, mask, _ = _inputs(3, scale=1.0)
    a = spec.psft_loss(logp, old, mask, epsilon_low=0.05)[0]
    b = spec.psft_loss(logp, old, mask, epsilon_low=0.6)[0]
    assert a == b
    neg = -np.ones_like(logp)
    assert (
        spec.psft_loss(logp, old, mask, epsilon_low=0.05, advantages=neg)[0]
        != spec.psft_loss(logp, old, mask, epsilon_low=0.6, advantages=neg)[0]
    )


def test_clipped_tokens_get_no_gradient():
    logp = np.log(np.array([[0.5, 0.9, 1.1, 1.5]]))
    old = np.zeros_like(logp)
    _, grad, metrics = spec.psft_loss_and_grad(logp, old, np.ones_like(logp))
    assert grad[0, 3] == 0 and np.all(grad[0, :3] < 0)  # only r > 1 + eps_high clips for A > 0
    assert metrics["clipfrac"] == 0.25
    _, grad, _ = spec.psft_loss_and_grad(logp, old, np.ones_like(logp), advantages=-np.ones_like(logp))
    assert grad[0, 0] == 0 and np.all(grad[0, 1:] > 0)  # only r < 1 - eps_low clips for A < 0


def test_empty_mask_gives_zero_loss_and_gradient_not_nan():
    logp, old, _, _ = _inputs(4)
    for agg in spec.AGGREGATIONS:
        loss, grad, metrics = spec.psft_loss_and_grad(logp, old, np.zeros_like(logp), agg=agg)
        assert loss == 0.0 and not grad.any()
        assert all(np.isfinite(v) for v in metrics.values())


def test_token_logprobs_matches_log_softmax_and_ignores():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 7))
    targets = np.array([[1, -100, 6], [0, 2, -100]])
    logp = spec.token_logprobs(logits, targets)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert logp.dtype == np.float32
    assert logp[0, 1] == 0 and logp[1, 2] == 0
    assert logp[0, 2] == pytest.approx(log_softmax[0, 2, 6], rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"epsilon_low": 1.0}, "epsilon_low"),
        ({"epsilon_low": -0.1}, "epsilon_low"),
        ({"epsilon_high": -0.01}, "epsilon_high"),
        ({"agg": "token-sum"}, "agg"),
        ({"num_tokens": -1}, "num_tokens"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, argument):
    logp, old, mask, _ = _inputs()
    with pytest.raises(ValueError, match=argument):
        spec.psft_loss(logp, old, mask, **kwargs)


def test_bad_inputs_name_the_argument():
    logp, old, mask, _ = _inputs()
    with pytest.raises(ValueError, match="old_logp"):
        spec.psft_loss(logp, old[:, :-1], mask)
    with pytest.raises(ValueError, match="mask"):
        spec.psft_loss(logp, old, mask[:-1])
    with pytest.raises(ValueError, match="advantages"):
        spec.psft_loss(logp, old, mask, advantages=np.ones(3))
    bad = logp.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="logp"):
        spec.psft_loss(bad, old, mask)
    with pytest.raises(ValueError, match="old_logp"):
        spec.psft_loss(logp, np.where(mask > 0, np.inf, old), mask)
    with pytest.raises(ValueError, match="targets"):
        spec.token_logprobs(np.zeros((1, 2, 3)), np.array([[0, 3]]))


def test_committed_vectors_equal_a_fresh_regeneration():
    assert stale_files() == [], "run `python -m psft_plugin.spec.make_vectors` and commit the result"
    assert make_vectors_main(["--check"]) == 0


@pytest.mark.parametrize("agg", spec.AGGREGATIONS)
def test_dft_gradient_is_the_detached_weight_times_the_ce_gradient(agg):
    """d/d logp of -stopgrad(p) * logp is -p * c (c the aggregation weights), not the full derivative of -p log p."""
    logp, _, mask, _ = _inputs(6)
    loss, grad, metrics = spec.dft_loss_and_grad(logp, None, mask, agg=agg)
    c = spec.aggregate_weights(mask, agg, None)
    np.testing.assert_allclose(grad, -np.exp(logp) * c, rtol=1e-15)
    assert loss == pytest.approx(float((c * -np.exp(logp) * logp).sum()), rel=1e-15)
    ce, ce_metrics = spec.ce_loss(logp, None, mask, agg=agg)
    assert 0 < loss < ce and metrics["nll"] == ce_metrics["nll"]  # every weight is below 1
    on = mask > 0
    assert metrics["weight_mean"] == pytest.approx(np.exp(logp)[on].mean())


def test_dft_on_certain_tokens_is_ce_and_empty_mask_gives_zero():
    logp, _, mask, _ = _inputs(7)
    certain = np.zeros_like(logp)  # p = 1: the weight is 1, the gradient is CE's
    _, grad, metrics = spec.dft_loss_and_grad(certain, None, mask)
    np.testing.assert_allclose(grad, -mask / mask.sum())
    assert metrics["weight_mean"] == 1.0
    for agg in spec.AGGREGATIONS:
        loss, grad, metrics = spec.dft_loss_and_grad(logp, None, np.zeros_like(logp), agg=agg)
        assert loss == 0.0 and not grad.any() and metrics == {"nll": 0.0, "weight_mean": 0.0, "tokens": 0.0}


def test_dft_bad_inputs_name_the_argument():
    logp, _, mask, _ = _inputs()
    with pytest.raises(ValueError, match="mask"):
        spec.dft_loss(logp, None, mask[:-1])
    with pytest.raises(ValueError, match="agg"):
        spec.dft_loss(logp, None, mask, agg="token-sum")
    with pytest.raises(ValueError, match="num_tokens"):
        spec.dft_loss(logp, None, mask, num_tokens=-1)
    with pytest.raises(ValueError, match="logp"):
        spec.dft_loss(np.where(mask > 0, np.nan, logp), None, mask)
