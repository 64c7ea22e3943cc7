"""``PSFTTrainer`` inside TRL's real ``SFTTrainer`` on the tiny model, against TRL's own losses.

One module-scoped set of in-process runs (4 optimizer steps, GA 2, the tiny model has no dropout):

- ``loss: psft`` with ``psft_refresh_steps: 1`` trains the weights of ``SFTTrainer(loss_type="nll")``
  (PSFT with K = 1 is SFT), for full fine-tuning and for each feature a TRL user turns on: a
  ``peft_config`` LoRA, prompt-completion data with ``completion_only_loss``, conversational data
  with ``assistant_only_loss``, ``packing=True`` (padding-free, position ids) and gradient
  checkpointing;
- ``loss: dft`` trains the weights of ``SFTTrainer(loss_type="dft")``: TRL's DFT is an external oracle;
- the comparisons can fail: DFT's weights differ from NLL's, and K = 4 clips (``psft/clipfrac`` > 0);
- TRL's own metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``) are logged with the same
  values as TRL's trainer logs, beside ``psft/*``;
- ``psft_lm_head_chunk_size`` (no ``[B, T, V]`` logits) gives the same per-step losses.

The weight comparisons use plain SGD in float32, bfloat16 autocast off (see ``trl_runs.COMMON``).
Measured on this machine (trl 1.14.1 and 0.24.0): every K = 1 comparison within 7.5e-9 (packing
included), DFT bitwise equal; a per-micro-batch mean instead of the step's token count, or targets
that cross the packed sequences' boundaries, end 2e-4 and 8e-3 from TRL's NLL with packing.
"""

from __future__ import annotations

import pytest
from cli_runs import max_diff
from trl import SFTConfig, SFTTrainer
from trl_runs import ADAM, train

from psft_plugin.integrations.trl import PSFTConfig, PSFTTrainer

TOLERANCE = 1e-5
FEATURES = {
    "full": {},
    "lora": {"peft_config": "lora"},
    "completion_only": {"completion_only_loss": True, "data": "prompt_completion"},
    "assistant_only": {"assistant_only_loss": True},
    "packing": {"packing": True},
    "gradient_checkpointing": {"gradient_checkpointing": True},
}
TRL_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")


def _datasets(data_dir):
    """The tiny chats (``messages``) and the same turns as prompt-completion strings."""
    from datasets import load_dataset

    chats = load_dataset("json", data_files=str(data_dir / "train.jsonl"), split="train")
    pairs = chats.map(
        lambda row: {"prompt": row["messages"][0]["content"] + "\n", "completion": row["messages"][1]["content"]},
        remove_columns=["messages"],
    )
    return {"chat": chats, "prompt_completion": pairs}


def _settings(feature: str) -> tuple[str, dict]:
    settings = dict(FEATURES[feature])
    data = settings.pop("data", "chat")
    if settings.get("peft_config") == "lora":
        from peft import LoraConfig

        settings["peft_config"] = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return data, settings


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """``{name: (weights, log_history, trainer)}``, trained once for the module."""
    model_dir, data_dir = tiny_assets
    data, out = _datasets(data_dir), tmp_path_factory.mktemp("trl")
    results = {}

    def run(name, trainer_cls, config_cls, feature="full", **extra):
        kind, settings = _settings(feature)
        results[name] = train(trainer_cls, config_cls, model_dir, data[kind], out / name, **settings, **extra)

    for feature in FEATURES:
        run(f"nll-{feature}", SFTTrainer, SFTConfig, feature, loss_type="nll")
        run(f"k1-{feature}", PSFTTrainer, PSFTConfig, feature, loss="psft", psft_refresh_steps=1)
    run("trl-dft", SFTTrainer, SFTConfig, loss_type="dft")
    run("dft", PSFTTrainer, PSFTConfig, loss="dft")
    run("k4", PSFTTrainer, PSFTConfig, loss="psft", psft_refresh_steps=4, **ADAM)
    run("k1-chunked", PSFTTrainer, PSFTConfig, loss="psft", psft_refresh_steps=1, psft_lm_head_chunk_size=16)
    return results


def _steps(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "loss" in entry]


@pytest.mark.parametrize("feature", FEATURES)
def test_k1_trains_the_weights_of_trls_nll(runs, feature):
    (reference, _, sft), (ours, log, trainer) = runs[f"nll-{feature}"], runs[f"k1-{feature}"]
    assert trainer.psft_logprob_path.name == "full logits" and isinstance(trainer, SFTTrainer)
    diff = max_diff(ours, reference)
    print(f"TRL {feature}: PSFT K=1 vs SFTTrainer(loss_type='nll'), GA 2: max |dw| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert len(_steps(log)) == 4 and all("psft/clipfrac" in step for step in _steps(log))
    if feature == "packing":  # padding-free: position ids and no attention mask
        assert sft.padding_free and trainer.padding_free


def test_dft_trains_the_weights_of_trls_dft(runs):
    ours, trl_dft, trl_nll = runs["dft"][0], runs["trl-dft"][0], runs["nll-full"][0]
    diff, apart = max_diff(ours, trl_dft), max_diff(trl_dft, trl_nll)
    print(f"TRL: loss: dft vs SFTTrainer(loss_type='dft'): max |dw| = {diff:.3g}; TRL's dft vs nll: {apart:.3g}")
    assert diff <= TOLERANCE
    assert apart > 100 * TOLERANCE  # the comparison can fail: another objective trains other weights


def test_k4_clips(runs):
    _, log, _ = runs["k4"]
    clipfrac = [step["psft/clipfrac"] for step in _steps(log)]
    print(f"TRL: PSFT K=4 psft/clipfrac per step: {clipfrac}")
    assert clipfrac[0] == 0 and max(clipfrac) > 0  # step 1 is its own old policy; later steps clip


def test_trls_own_metrics_are_logged_as_trl_logs_them(runs):
    reference, ours = _steps(runs["nll-full"][1]), _steps(runs["k1-full"][1])
    for theirs, mine in zip(reference, ours):
        for key in TRL_METRICS:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key


def test_the_chunked_lm_head_gives_the_same_losses(runs):
    _, log, trainer = runs["k1-chunked"]
    assert trainer.psft_logprob_path.name == "LM head in chunks of 16 tokens"
    for theirs, mine in zip(_steps(runs["k1-full"][1]), _steps(log)):
        assert mine["psft/nll"] == pytest.approx(theirs["psft/nll"], rel=1e-4)
        assert mine["entropy"] == pytest.approx(theirs["entropy"], rel=1e-4)
        assert mine["num_tokens"] == theirs["num_tokens"]
