"""psft_mlx.trainer: the old-policy window, global token-mean over GA, K = 1 equals SFT."""

import copy

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from psft_mlx.data import MicroBatch, to_micro_batch
from psft_mlx.loss import ce_loss
from psft_mlx.trainer import LoopArgs, make_step_fn, model_logprobs, optimizer_step, train
from psft_plugin import Objective, get_objective
from psft_plugin.config import resolve

VOCAB, WIDTH, BATCH = 40, 12, 3


def _model(seed=0):
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def _batches(count, seed=0, width=WIDTH):
    """Ragged micro-batches; the first input token of each is its index (to track the order)."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        tokens = rng.integers(1, VOCAB, size=(BATCH, width + 1)).astype(np.int32)
        tokens[0, 0] = index
        lengths = np.stack([rng.integers(0, 4, BATCH), rng.integers(5, width + 2, BATCH)], axis=1)
        out.append(to_micro_batch(mx.array(tokens), mx.array(lengths)))
    return out


def _weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def _train(objective, options, batches, iters, ga, lr=1e-2, model=None, start_iteration=0, **kw):
    """``iters`` iterations (micro-batches), an optimizer step every ``ga``; ``start_iteration``: a resume."""
    model = model or _model()
    records = train(
        model,
        optim.AdamW(learning_rate=lr, bias_correction=True),
        iter(batches),
        resolve({"loss": objective, **options}),
        LoopArgs(
            iters=iters,
            grad_accumulation_steps=ga,
            steps_per_report=100,
            steps_per_eval=100,
            compile=False,
            start_iteration=start_iteration,
        ),
        warmup_objective=get_objective("ce"),
        **kw,
    )
    return model, records


def test_refresh_every_k_steps_with_sft_data_order_and_stamps_from_the_refresh_weights():
    batches, initial = _batches(14), _model()
    expected_old = [np.array(model_logprobs(initial, mb.inputs, mb.targets)[0]) for mb in batches[:6]]
    seen = []

    def recording_logprobs(model, inputs, targets):
        if model.training:
            seen.append(int(inputs[0, 0].item()))
        return model_logprobs(model, inputs, targets)

    model, records = _train("psft", {"psft_refresh_steps": 3}, batches, iters=14, ga=2, logprobs_fn=recording_logprobs)
    assert [r["refresh"] for r in records] == [1, 0, 0, 1, 0, 0, 1]
    assert seen == list(range(14))  # every micro-batch once, in SFT's order
    assert all(mb.old_logp is None for mb in (*batches[:2], *batches[6:8], *batches[12:]))
    for mb, old in zip(batches[2:6], expected_old[2:6]):  # stamped before the window's first update
        np.testing.assert_allclose(np.array(mb.old_logp), old, atol=1e-6)
    for record in records:
        first = record["refresh"] == 1
        assert (record["ratio_min"] == record["ratio_max"] == 1.0) == first
        assert (record["clipfrac"] == 0.0) if first else record["approx_kl"] != 0.0


def test_warmup_trains_plain_sft_then_starts_the_windows():
    _, records = _train("psft", {"psft_refresh_steps": 2, "psft_warmup_steps": 2}, _batches(6), iters=6, ga=1)
    assert [r["refresh"] for r in records] == [0, 0, 1, 0, 1, 0]
    assert "clipfrac" not in records[0] and "clipfrac" in records[2]
    assert records[0]["loss"] == pytest.approx(records[0]["nll"], rel=1e-6)


def test_a_resume_mid_window_trains_a_shortened_window_up_to_the_next_boundary():
    """K = 3, GA 1: windows start at steps 0, 3, 6 (from 0), as in the torch trainer. Resumed after
    4 steps (inside [3, 6)), the loop refreshes for a window of two steps, then again at step 6."""
    _, records = _train("psft", {"psft_refresh_steps": 3}, _batches(4), iters=8, ga=1, start_iteration=4)
    assert [r["step"] for r in records] == [5, 6, 7, 8]
    assert [r["refresh"] for r in records] == [1, 0, 1, 0]


def test_k1_equals_ce_step_for_step():
    ce_model, ce = _train("ce", {}, _batches(8), iters=8, ga=2, lr=5e-2)
    k1_model, k1 = _train("psft", {"psft_refresh_steps": 1}, _batches(8), iters=8, ga=2, lr=5e-2)
    for a, b in zip(ce, k1):
        assert a["loss"] == pytest.approx(b["nll"], abs=1e-6) and b["loss"] == pytest.approx(-1.0, abs=1e-6)
    for name, value in _weights(ce_model).items():
        np.testing.assert_allclose(_weights(k1_model)[name], value, atol=1e-6, err_msg=name)


def _concatenate(group):
    return MicroBatch(
        inputs=mx.concatenate([mb.inputs for mb in group]),
        targets=mx.concatenate([mb.targets for mb in group]),
        mask=mx.concatenate([mb.mask for mb in group]),
        tokens=sum(mb.tokens for mb in group),
        rows=sum(mb.rows for mb in group),
        old_logp=mx.concatenate([mb.old_logp for mb in group]),
    )


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grad_accumulation_is_the_global_mean_over_the_step(agg):
    """Two ragged micro-batches accumulated == one batch holding both (SGD lr 1: delta = -grad)."""
    group = _batches(2, seed=3)
    for mb in group:  # an old policy far enough away that clipping binds on some tokens
        mb.old_logp = model_logprobs(_model(seed=7), mb.inputs, mb.targets)[0] * 0.95
    assert group[0].tokens != group[1].tokens
    objective = get_objective("psft")
    kwargs = objective.loss_kwargs(objective.resolve({"psft_loss_agg": agg}))
    results = []
    for micro_batches in (group, [_concatenate(group)]):
        model = _model()
        before = _weights(model)
        step_fn = make_step_fn(model, objective.loss_fn("mlx"), kwargs, compile=False)
        metrics = optimizer_step(model, optim.SGD(learning_rate=1.0), step_fn, micro_batches, agg)
        results.append((metrics, {k: before[k] - v for k, v in _weights(model).items()}))
    (split, split_grad), (whole, whole_grad) = results
    assert 0 < whole["clipfrac"] < 1
    for name in ("loss", "clipfrac", "nll", "ratio_mean", "ratio_min", "ratio_max", "approx_kl", "tokens"):
        assert split[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-7), name
    for name, grad in whole_grad.items():
        np.testing.assert_allclose(split_grad[name], grad, rtol=1e-4, atol=1e-7, err_msg=name)


def test_a_step_without_response_tokens_is_zero_not_nan():
    model = _model()
    mb = copy.copy(_batches(1)[0])
    mb.mask, mb.tokens, mb.rows = mx.zeros_like(mb.mask), 0, 0
    objective = get_objective("psft")
    step_fn = make_step_fn(model, objective.loss_fn("mlx"), objective.loss_kwargs(objective.resolve({})), compile=False)
    before = _weights(model)
    metrics = optimizer_step(model, optim.SGD(learning_rate=1.0), step_fn, [mb], "token-mean")
    assert metrics["loss"] == 0.0 and metrics["tokens"] == 0.0
    for name, value in _weights(model).items():
        np.testing.assert_array_equal(value, before[name])


def test_a_forward_without_entropies_drops_only_that_metric():
    def logprobs_only(model, inputs, targets):
        return model_logprobs(model, inputs, targets)[0], None

    _, records = _train("psft", {"psft_refresh_steps": 2}, _batches(4), iters=4, ga=2, logprobs_fn=logprobs_only)
    assert all("entropy" not in r and "clipfrac" in r for r in records)


def ce_with_my_metric(logp, old_logp, mask, *, num_tokens=None):
    """A third-party objective's MLX loss: CE plus a metric no built-in has (twice the NLL, a token mean)."""
    loss, metrics = ce_loss(logp, old_logp, mask, num_tokens=num_tokens)
    return loss, {**metrics, "my_metric": 2 * metrics["nll"]}


class _Reports:
    def __init__(self):
        self.train = []

    def on_train_loss_report(self, info):
        self.train.append(info)

    def on_val_loss_report(self, info):
        pass


def test_every_metric_an_objective_returns_reaches_the_records_and_the_report(register_objective):
    register_objective(
        Objective(
            name="ce_plus",
            description="CE with an extra metric",
            implementations={"mlx": f"{__name__}:ce_with_my_metric"},
        )
    )
    reports = _Reports()
    _, records = _train("ce_plus", {}, _batches(4), iters=4, ga=2, callback=reports)
    assert len(records) == 2 and len(reports.train) == 1
    for record in records:
        assert record["my_metric"] == pytest.approx(2 * record["nll"], rel=1e-6)
    (report,) = reports.train
    assert report["psft/my_metric"] == pytest.approx(2 * report["psft/nll"], rel=1e-6)
