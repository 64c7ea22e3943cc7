"""psft_mlx.config: keys declared once, CLI over YAML, every problem named with its fix."""

import pytest

from psft_mlx.config import MLX_KEYS, build_parser, load_config, resolve_config
from psft_plugin.registry import default_registry
from psft_plugin.options import ConfigError


@pytest.fixture
def paths(tiny):
    model, data = tiny
    return {"model": str(model), "data": str(data)}


def _problems(values):
    with pytest.raises(ConfigError) as error:
        resolve_config(values)
    return error.value.problems


def test_every_declared_key_has_one_flag_and_psft_flags_come_from_the_registry():
    flags = {action.dest: action for action in build_parser()._actions}
    for key in MLX_KEYS:
        assert (key.name in flags) == key.flag, key.name
    for key, option in default_registry().options().items():
        assert key in flags and option.help in flags[key].help
    assert "loss" in flags


def test_cli_overrides_yaml_and_yaml_floats_parse(tmp_path, paths):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {paths['model']}\ndata: {paths['data']}\nlearning_rate: 1e-5\niters: 7\n"
                      f"loss: psft\npsft_refresh_steps: 4\nmask_prompt: true\n")
    cfg = load_config(["--config", str(config), "--iters", "3", "--psft-epsilon-high", "0.5", "--no-mask-prompt"])
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.iters == 3 and cfg.mask_prompt is False
    assert cfg.psft["psft_epsilon_high"] == 0.5 and cfg.psft["psft_refresh_steps"] == 4
    assert cfg.objective.name == "psft" and cfg.objective.uses_old_policy
    assert cfg.batch_size == 4 and cfg.lora_parameters == {"rank": 8, "dropout": 0.0, "scale": 20.0}


def test_unknown_keys_are_named_with_the_close_match(paths):
    problems = _problems({**paths, "lerning_rate": 1e-4, "loss": "psft", "psft_epsilon_hihg": 0.3,
                          "lora_parameters": {"rnak": 4}})
    text = "\n".join(problems)
    assert "unknown key `lerning_rate` (did you mean `learning_rate`?)" in text
    assert "unknown key `psft_epsilon_hihg` (did you mean `psft_epsilon_high`?)" in text
    assert "lora_parameters" in text and "`rnak` (did you mean `rank`?)" in text


def test_unknown_loss_lists_the_objectives(paths):
    (problem,) = _problems({**paths, "loss": "pstf"})
    assert "`loss: pstf`" in problem and "did you mean `psft`" in problem and "ce, psft" in problem


@pytest.mark.parametrize("key, value, words", [
    ("psft_epsilon_low", 1.5, "< 1.0"),
    ("psft_epsilon_high", -0.1, ">= 0.0"),
    ("psft_refresh_steps", 0, ">= 1"),
    ("psft_refresh_steps", 2.5, "whole number"),
    ("psft_loss_agg", "mean", "token-mean"),
])
def test_bad_psft_values_are_refused(paths, key, value, words):
    (problem,) = _problems({**paths, "loss": "psft", key: value})
    assert key in problem and words in problem


def test_every_problem_is_reported_at_once(tmp_path):
    problems = _problems({"model": str(tmp_path / "nope"), "data": str(tmp_path / "nodata"), "batch_size": 0,
                          "loss": "psft", "psft_refresh_steps": 0, "fine_tune_type": "qlora"})
    text = "\n".join(problems)
    for words in ("`model:", "does not exist", "`data:", "batch_size", "psft_refresh_steps", "fine_tune_type"):
        assert words in text, words
    assert len(problems) == 5


def test_missing_model_and_data_paths_name_the_fix(tmp_path, paths):
    (problem,) = _problems({**paths, "model": str(tmp_path / "missing")})
    assert "does not exist" in problem and "--model PATH" in problem
    (problem,) = _problems({**paths, "data": str(tmp_path / "missing")})
    assert "does not exist" in problem and "--data PATH" in problem
    (tmp_path / "empty").mkdir()
    (problem,) = _problems({**paths, "data": str(tmp_path / "empty")})
    assert "train.jsonl" in problem
    (problem,) = _problems({**paths, "resume_adapter_file": str(tmp_path / "a.safetensors")})
    assert "resume_adapter_file" in problem


def test_psft_keys_without_loss_never_train_ce_silently(paths):
    (problem,) = _problems({**paths, "psft_refresh_steps": 4})
    assert "psft_refresh_steps" in problem and "set `loss: psft`" in problem
    cfg = resolve_config({**paths, "loss": "ce", "psft_refresh_steps": 4})  # an explicit comparison run
    assert cfg.objective.name == "ce" and any("ignores `psft_refresh_steps`" in n for n in cfg.notes)
    assert cfg.psft == {"psft_loss_agg": "token-mean"}


def test_train_false_and_unsupported_keys_are_refused(paths):
    text = "\n".join(_problems({**paths, "train": False, "report_to": "wandb"}))
    assert "train: false" in text and "`report_to` is not supported" in text


def test_the_trainer_modules_import_neither_torch_nor_mlx_lm():
    """mlx-lm (through transformers) may pull torch in where it is installed; our modules never do."""
    import subprocess
    import sys

    code = ("import sys, psft_mlx.config, psft_mlx.data, psft_mlx.run, psft_mlx.trainer, psft_plugin.mlx_train\n"
            "assert not {'torch', 'mlx_lm', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
