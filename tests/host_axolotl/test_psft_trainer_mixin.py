"""PSFTTrainerMixin on a plain ``transformers.Trainer`` subclass (in process, tiny model).

Semantics checked here without Axolotl: K = 1 is SFT (and our CE equals transformers' own
token-mean CE), the loss is a global token-mean (the accumulation split does not matter), old
log-probs are stamped only for (K-1)/K of the micro-batches, windows restart at epoch
boundaries, warm-up trains CE, evaluation stays CE, metrics reach the log.
"""

import math

import pytest
import torch
from in_process import PSFTSequentialTrainer, SequentialTrainer, tokenized_chats, training_args
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from psft_plugin import ConfigError, Objective
from psft_plugin.metrics import combine, prefixed
from psft_torch.loss import ce_loss
from psft_torch.trainer import StepMetrics, model_logits


def _train(
    tiny_assets,
    tmp_path,
    psft_config=None,
    *,
    batch=2,
    accum=2,
    steps=4,
    lr=1e-3,
    epochs=1,
    rows=32,
    evaluate=False,
    model_hook=None,
    optim="adamw_torch",
):
    """Train the tiny model; returns ``(trainer, {name: weight})``. ``psft_config=None``: plain Trainer."""
    model_dir, data_dir = tiny_assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if model_hook:
        model_hook(model)
    args = training_args(
        tmp_path,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        num_train_epochs=epochs,
        learning_rate=lr,
        optim=optim,
        max_grad_norm=0.0,
        save_strategy="no",
    )
    kwargs = dict(
        model=model,
        args=args,
        train_dataset=tokenized_chats(tokenizer, data_dir, "train", rows),
        eval_dataset=tokenized_chats(tokenizer, data_dir, "valid", 8),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    if psft_config is None:
        trainer = SequentialTrainer(**kwargs)
    else:
        trainer = PSFTSequentialTrainer(**kwargs, psft_config=psft_config)
    if evaluate:
        trainer.eval_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    return trainer, {name: p.detach().clone() for name, p in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def _fresh(entry: dict) -> bool:
    """A window's first step: r = 1 exactly on every token."""
    return entry["psft/ratio_min"] == entry["psft/ratio_max"] == 1.0


def _steps(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_k1_psft_equals_our_ce_equals_transformers_ce(tiny_assets, tmp_path):
    """K = 1: r = 1 at every step, so PSFT is SFT step for step (accumulation 2, ragged rows).

    Against transformers' own loss (``F.cross_entropy``; ours is logsumexp + gather) the
    gradients differ by ~1e-9, which Adam would blow up on near-zero gradients: compare with SGD.
    """
    _, native = _train(tiny_assets, tmp_path / "native", None, lr=1e-2, optim="sgd")
    _, ce_sgd = _train(tiny_assets, tmp_path / "ce_sgd", {"loss": "ce"}, lr=1e-2, optim="sgd")
    ce_trainer, ce = _train(tiny_assets, tmp_path / "ce", {"loss": "ce"}, lr=1e-2)
    _, k1 = _train(tiny_assets, tmp_path / "k1", {"loss": "psft", "psft_refresh_steps": 1}, lr=1e-2)
    _, k4 = _train(tiny_assets, tmp_path / "k4", {"loss": "psft", "psft_refresh_steps": 4}, lr=1e-2)
    print(f"max |w_ce - w_native| = {_max_diff(ce_sgd, native):.3g}, max |w_k1 - w_ce| = {_max_diff(k1, ce):.3g}")
    assert _max_diff(ce_sgd, native) < 1e-7  # transformers' own CE is a token-mean over the step too
    assert _max_diff(k1, ce) < 1e-6
    assert _max_diff(k4, ce) > 1e-4  # a real window changes the updates
    assert all("psft/nll" in entry and "psft/clipfrac" not in entry for entry in _steps(ce_trainer))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_loss_is_a_token_mean_over_the_whole_step(tiny_assets, tmp_path, agg):
    """The same 4 rows per step split 4x1, 2x2 or 1x4 give the same weights (a mean of
    micro-batch means would not: the rows have different lengths). SGD, so that padding's
    ~1e-9 numerical noise is not amplified by Adam's normalisation."""
    config = {"loss": "psft", "psft_refresh_steps": 2, "psft_loss_agg": agg}
    _, one = _train(tiny_assets, tmp_path / "a", config, batch=1, accum=4, lr=0.5, optim="sgd")
    _, two = _train(tiny_assets, tmp_path / "b", config, batch=2, accum=2, lr=0.5, optim="sgd")
    _, four = _train(tiny_assets, tmp_path / "c", config, batch=4, accum=1, lr=0.5, optim="sgd")
    _, init = _train(tiny_assets, tmp_path / "d", config, steps=1, lr=0.0, optim="sgd")
    print(
        f"accumulation split: max diff {max(_max_diff(one, two), _max_diff(one, four)):.3g}, "
        f"moved {_max_diff(one, init):.3g}"
    )
    assert _max_diff(one, two) < 1e-6 and _max_diff(one, four) < 1e-6
    assert _max_diff(one, init) > 1e-3


def test_window_stamps_only_later_groups_and_reports_metrics(tiny_assets, tmp_path):
    """K = 4, 8 steps x 2 micro-batches: 12 of 16 micro-batches get an extra no-grad forward
    (in eval mode); r = 1 exactly on each window's first step; clipping binds at a high lr."""
    forwards = []

    def count(model):
        model.register_forward_pre_hook(lambda module, _: forwards.append((torch.is_grad_enabled(), module.training)))

    trainer, _ = _train(
        tiny_assets, tmp_path, {"loss": "psft", "psft_refresh_steps": 4}, steps=8, lr=3e-2, model_hook=count
    )
    stamps = [f for f in forwards if not f[0]]
    assert len(stamps) == 12 and not any(training for _, training in stamps)
    assert sum(grad for grad, _ in forwards) == 16
    logs = _steps(trainer)
    assert len(logs) == 8
    for entry in logs:
        assert {
            "psft/clipfrac",
            "psft/ratio_mean",
            "psft/ratio_min",
            "psft/ratio_max",
            "psft/approx_kl",
            "psft/entropy",
            "psft/nll",
            "psft/objective",
        } <= entry.keys()
        first_of_window = (entry["step"] - 1) % 4 == 0
        assert _fresh(entry) == first_of_window, entry
        assert entry["loss"] == pytest.approx(entry["psft/objective"], rel=1e-5)
    assert max(entry["psft/clipfrac"] for entry in logs) > 0


def test_windows_restart_at_each_epoch_and_stay_aligned(tiny_assets, tmp_path):
    """16 rows, batch 2: 8 steps per epoch, K = 3. Windows start at steps 0, 3, 6, then the new
    epoch's iterator opens a fresh one at 8 (cut to realign), then 9, 12, 15."""
    trainer, _ = _train(
        tiny_assets,
        tmp_path,
        {"loss": "psft", "psft_refresh_steps": 3},
        batch=2,
        accum=1,
        steps=-1,
        epochs=2,
        rows=16,
        lr=3e-2,
    )
    fresh = [entry["step"] - 1 for entry in _steps(trainer) if _fresh(entry)]
    assert len(_steps(trainer)) == 16
    assert fresh == [0, 3, 6, 8, 9, 12, 15]


def test_a_short_last_accumulation_step_is_trained_once(tiny_assets, tmp_path):
    """16 rows, batch 2, accumulation 3: micro-batches 3 + 3 + 2. K = 2 stamps only the second
    step's 3 micro-batches; every micro-batch is trained exactly once."""
    forwards = []

    def count(model):
        model.register_forward_pre_hook(lambda module, _: forwards.append(torch.is_grad_enabled()))

    trainer, _ = _train(
        tiny_assets,
        tmp_path,
        {"loss": "psft", "psft_refresh_steps": 2},
        batch=2,
        accum=3,
        steps=-1,
        epochs=1,
        rows=16,
        lr=3e-2,
        model_hook=count,
    )
    assert len(_steps(trainer)) == 3
    assert forwards.count(True) == 8 and forwards.count(False) == 3


def test_a_model_without_logits_stops_with_the_options_to_change():
    with pytest.raises(RuntimeError, match="cut_cross_entropy.*liger_fused_linear_cross_entropy"):
        model_logits({"logits": None, "loss": torch.zeros(())}, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="logits_to_keep"):
        model_logits({"logits": torch.zeros(2, 1, 7)}, torch.zeros(2, 5, dtype=torch.long))


def test_warmup_trains_plain_sft_first(tiny_assets, tmp_path):
    trainer, _ = _train(
        tiny_assets, tmp_path, {"loss": "psft", "psft_refresh_steps": 2, "psft_warmup_steps": 2}, steps=6, lr=3e-2
    )
    logs = _steps(trainer)
    assert all("psft/clipfrac" not in e and e["loss"] == pytest.approx(e["psft/nll"], rel=1e-5) for e in logs[:2])
    assert [e["step"] for e in logs[2:] if _fresh(e)] == [3, 5]


def test_evaluation_reports_plain_cross_entropy(tiny_assets, tmp_path):
    plain, _ = _train(tiny_assets, tmp_path / "plain", None, steps=1, evaluate=True)
    psft, _ = _train(tiny_assets, tmp_path / "psft", {"loss": "psft"}, steps=1, evaluate=True)
    assert psft.eval_before == pytest.approx(plain.eval_before, rel=1e-6)


def test_bad_trainer_config_names_every_problem(tiny_assets, tmp_path):
    with pytest.raises(ConfigError) as error:
        _train(tiny_assets, tmp_path, {"loss": "psft", "psft_refresh_step": 4, "psft_epsilon_low": 1.0})
    assert "did you mean `psft_refresh_steps`" in str(error.value) and "psft_epsilon_low" in str(error.value)
    with pytest.raises(ConfigError, match="did you mean `psft`"):  # one list of problems, as in every host
        _train(tiny_assets, tmp_path, {"loss": "pstf"})


def test_step_metrics_on_tensors_follow_the_core_rule():
    """The trainer's device-side step reduction equals psft_plugin.metrics.combine on the same parts,
    a micro-batch without tokens (whose extremes must not count) and a third-party metric included."""
    parts = [
        (-0.25, {"tokens": 3.0, "nll": 2.0, "ratio_min": 0.9, "ratio_max": 1.2, "my_metric": 5.0}, 6.0),
        (-0.5, {"tokens": 5.0, "nll": 1.0, "ratio_min": 0.8, "ratio_max": 1.1, "my_metric": 1.0}, 5.0),
        (0.0, {"tokens": 0.0, "nll": 0.0, "ratio_min": 0.1, "ratio_max": 9.0, "my_metric": 0.0}, 0.0),
    ]
    step = StepMetrics()
    for loss, metrics, entropy_sum in parts:
        step.add(torch.tensor(loss), {k: torch.tensor(v) for k, v in metrics.items()}, torch.tensor(entropy_sum))
    expected = combine(
        [
            {**metrics, "objective": loss, **({"entropy": entropy / metrics["tokens"]} if metrics["tokens"] else {})}
            for loss, metrics, entropy in parts
        ]
    )
    assert step.reduce() == pytest.approx(prefixed(expected), rel=1e-6)


def ce_with_my_metric(logp, old_logp, mask, *, num_tokens=None):
    """A third-party objective's torch loss: CE plus a metric no built-in has (twice the NLL, a token mean)."""
    loss, metrics = ce_loss(logp, old_logp, mask, num_tokens=num_tokens)
    return loss, {**metrics, "my_metric": 2 * metrics["nll"]}


def test_every_metric_an_objective_returns_reaches_the_log(tiny_assets, tmp_path, register_objective):
    """Accumulation 2 over ragged rows: ``psft/my_metric`` is token-weighted over the step like ``psft/nll``."""
    register_objective(
        Objective(
            name="ce_plus",
            description="CE with an extra metric",
            implementations={"torch": f"{__name__}:ce_with_my_metric"},
        )
    )
    trainer, _ = _train(tiny_assets, tmp_path, {"loss": "ce_plus"}, steps=2)
    logs = _steps(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert entry["psft/my_metric"] == pytest.approx(2 * entry["psft/nll"], rel=1e-6)


@pytest.mark.parametrize("loss", ["psft", "ce"])
def test_chunked_lm_head_trains_like_full_logits(tiny_assets, tmp_path, loss):
    """`psft_lm_head_chunk_size` changes where log-probs come from, not the training: same weights,
    metrics and eval loss as full logits (SGD, accumulation 2, ragged rows), for every objective,
    and the head never produces more than a chunk of logits (the stamp and eval included)."""
    shapes = []

    def watch(model):
        model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))

    config = {"loss": loss, **({"psft_refresh_steps": 2} if loss == "psft" else {})}
    full_trainer, full = _train(tiny_assets, tmp_path / "full", config, lr=0.5, optim="sgd", evaluate=True)
    chunked_trainer, chunked = _train(
        tiny_assets,
        tmp_path / "chunked",
        {**config, "psft_lm_head_chunk_size": 5},
        lr=0.5,
        optim="sgd",
        evaluate=True,
        model_hook=watch,
    )
    print(f"chunked vs full logits ({loss}): max |dw| = {_max_diff(chunked, full):.3g}")
    assert _max_diff(chunked, full) < 1e-6
    assert chunked_trainer.eval_before == pytest.approx(full_trainer.eval_before, rel=1e-6)
    for one, two in zip(_steps(full_trainer), _steps(chunked_trainer), strict=True):
        assert one.keys() == two.keys() and "psft/entropy" in one
        for key in ("loss", "psft/nll", "psft/entropy", "psft/clipfrac", "psft/ratio_max"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    vocab = chunked_trainer.model.config.vocab_size
    assert shapes[0] == (1, 8, vocab)  # the one-off transform check
    assert all(shape[-1] == 0 or shape == (*shape[:-1], vocab) and math.prod(shape[:-1]) <= 5 for shape in shapes[1:])
