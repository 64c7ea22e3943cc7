"""The real CLI end to end on the tiny model; outputs reload in mlx-lm (load, generate, fuse)."""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_runs import SFT_KEYS, TINY_YAML, reports, train_cli

from psft_plugin.mlx_train.config import resolve_config
from psft_plugin.mlx_train.run import build_optimizer, load_data, make_evaluate, prepare_model, resume, run
from psft_plugin.options import ConfigError


def _reloaded_val_nll(tiny, adapter_dir):
    """Validation NLL of ``mlx_lm.load(model, adapter_path=...)`` over the whole valid split."""
    from mlx_lm import load

    model, tokenizer = load(str(tiny[0]), adapter_path=str(adapter_dir))
    cfg = resolve_config(json.loads((adapter_dir / "adapter_config.json").read_text()) | {"val_batches": -1})
    _, valid, _ = load_data(cfg, tokenizer)
    return make_evaluate(valid, cfg, -1)(model)[0], model, tokenizer


def _assert_generates_greedily(model, tokenizer, max_tokens: int = 6) -> None:
    """mlx-lm's ``generate`` with the loaded adapters gives the greedy continuation of our own forward."""
    from mlx_lm import generate

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True
    )
    tokens, expected = list(prompt), []
    for _ in range(max_tokens):
        token = int(mx.argmax(model(mx.array([tokens]))[0, -1]).item())
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
        expected.append(token)
    assert generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens) == tokenizer.decode(expected)


@pytest.mark.e2e
def test_lora_psft_clips_at_a_large_lr_and_its_adapters_load_generate_and_fuse(lora_run, tiny, tmp_path, monkeypatch):
    out, stdout = lora_run
    train_reports = reports(out, "train")
    assert [r["iteration"] for r in train_reports] == [2, 4, 6, 8]
    assert max(r["psft/clipfrac"] for r in train_reports) > 0  # K = 2 windows drift past 1 + eps
    assert all(r["tokens_per_second"] > 0 and r["peak_memory"] > 0 for r in train_reports)
    for words in (
        "Trainable parameters: ",
        "% (",
        "iter      loss      nll      tok/s   tokens   it/s  peak GB",
        "clip ",
        "ratio ",
        "kl ",
        "ent ",
        " val ",
        "save  0000004_adapters.safetensors",
        "train ",
        "8/8",
    ):
        assert words in stdout, words  # mlx-lm's console (cli_ui) plus the psft metrics
    assert {
        "adapters.safetensors",
        "0000004_adapters.safetensors",
        "0000008_adapters.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
    } <= {p.name for p in out.iterdir()}

    final_val = reports(out, "val")[-1]
    assert final_val["iteration"] == 8
    reloaded, model, tokenizer = _reloaded_val_nll(tiny, out)
    assert reloaded == pytest.approx(final_val["val_loss"], rel=1e-5)
    _assert_generates_greedily(model, tokenizer)

    from mlx_lm import fuse, load

    monkeypatch.setattr(
        sys,
        "argv",
        ["fuse", "--model", str(tiny[0]), "--adapter-path", str(out), "--save-path", str(tmp_path / "fused")],
    )
    fuse.main()
    fused, _ = load(str(tmp_path / "fused"))
    tokens = mx.array([tokenizer.encode("<|im_start|>user\nRepeat: red dog<|im_end|>\n")])
    np.testing.assert_allclose(np.array(fused(tokens)), np.array(model(tokens)), atol=1e-4)


@pytest.mark.e2e
def test_full_fine_tuning_saves_weights_mlx_lm_loads(tiny, tmp_path):
    out = tmp_path / "full"
    train_cli(tiny, out, "--fine-tune-type", "full", "--num-layers", "1", "--iters", "4", "--val-batches", "-1")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "full" and config["lora_parameters"] is None
    names = set(mx.load(str(out / "adapters.safetensors")))
    assert names and all(name.startswith("model.layers.1.") for name in names)  # only the top block trained
    reloaded, model, tokenizer = _reloaded_val_nll(tiny, out)
    assert reloaded == pytest.approx(reports(out, "val")[-1]["val_loss"], rel=1e-5)
    _assert_generates_greedily(model, tokenizer)


@pytest.mark.e2e
def test_refresh_every_step_equals_ce_step_for_step(run_cli, ce_run, tiny, tmp_path):
    refused = run_cli("--config", str(TINY_YAML), "--loss", "ce")  # PSFT keys under `loss: ce`: an error in every host
    assert refused.returncode == 2 and "`psft_refresh_steps` has no effect with `loss: ce`" in refused.stderr
    ce_dir, _ = ce_run  # the SFT baseline: the tiny YAML without its PSFT keys, SFT_KEYS set
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SFT_KEYS.items()]
    train_cli(tiny, tmp_path / "k1", "--psft-refresh-steps", "1", *flags)
    ce, k1 = reports(ce_dir, "train"), reports(tmp_path / "k1", "train")
    assert len(ce) == len(k1) == 4
    for a, b in zip(ce, k1):
        assert b["psft/nll"] == pytest.approx(a["train_loss"], abs=1e-6)
        assert b["psft/clipfrac"] == 0.0 and b["train_loss"] == pytest.approx(-1.0, abs=1e-6)
    ce_w, k1_w = (mx.load(str(d / "adapters.safetensors")) for d in (ce_dir, tmp_path / "k1"))
    assert ce_w.keys() == k1_w.keys()
    for name in ce_w:
        np.testing.assert_allclose(np.array(k1_w[name]), np.array(ce_w[name]), atol=1e-6, err_msg=name)


@pytest.mark.e2e
def test_cli_reports_configuration_errors_and_exits_2(run_cli, tiny, tmp_path):
    result = run_cli(
        "--config", str(TINY_YAML), "--model", str(tmp_path / "no-model"), "--data", str(tiny[1]), "--loss", "psft-typo"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no-model` does not exist" in result.stderr and "did you mean `psft`" in result.stderr
    result = run_cli("--config", str(TINY_YAML), "--model", str(tiny[0]), "--data", str(tmp_path / "no-data"))
    assert result.returncode == 2 and "no-data` does not exist" in result.stderr


def _config(tiny, tmp_path, **values):
    model, data = tiny
    return resolve_config(
        {
            "model": str(model),
            "data": str(data),
            "adapter_path": str(tmp_path / "a"),
            "train": True,
            "batch_size": 4,
            "iters": 2,
            "num_layers": -1,
            "loss": "psft",
            "val_batches": 1,
            "steps_per_eval": 100,
            **values,
        }
    )


def test_data_without_trainable_tokens_is_a_configuration_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="no training example has a response token within `max_seq_length: 8`"):
        run(_config(tiny, tmp_path, mask_prompt=True, max_seq_length=8), log=lambda line: None)


def test_resume_loads_the_saved_trainable_weights_and_refuses_a_mismatch(tiny, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    run(_config(tiny, tmp_path), log=lambda line: None)
    saved = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    model, _ = load(str(tiny[0]))
    cfg = _config(tiny, tmp_path, resume_adapter_file=str(tmp_path / "a" / "adapters.safetensors"), iters=4)
    prepare_model(model, cfg)
    assert resume(model, build_optimizer(cfg), cfg, log=lambda line: None).iteration == 2
    resumed = dict(tree_flatten(model.trainable_parameters()))
    assert resumed.keys() == saved.keys()
    for name, value in saved.items():
        np.testing.assert_array_equal(np.array(resumed[name]), np.array(value))
    model, _ = load(str(tiny[0]))
    cfg = _config(
        tiny,
        tmp_path,
        fine_tune_type="full",
        num_layers=1,
        resume_adapter_file=str(tmp_path / "a" / "adapters.safetensors"),
    )
    prepare_model(model, cfg)
    with pytest.raises(ConfigError, match="not a trainable parameter"):
        resume(model, build_optimizer(cfg), cfg, log=lambda line: None)

    mlx_lm_file = tmp_path / "0000002_adapters.safetensors"  # an mlx_lm.lora adapter: no optimizer state beside it
    mlx_lm_file.write_bytes((tmp_path / "a" / "adapters.safetensors").read_bytes())
    model, _ = load(str(tiny[0]))
    cfg, notes = _config(tiny, tmp_path, resume_adapter_file=str(mlx_lm_file)), []
    prepare_model(model, cfg)
    start = resume(model, build_optimizer(cfg), cfg, log=notes.append)
    assert (start.iteration, start.tokens) == (2, 0.0)
    assert "the optimizer starts afresh (as in mlx_lm.lora)" in " ".join(" ".join(notes).split())
