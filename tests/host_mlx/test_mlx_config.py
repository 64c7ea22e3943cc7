"""psft_plugin.mlx_train.config: keys declared once, CLI over YAML, every problem named with its fix."""

import pytest

from psft_plugin.mlx_train.config import MLX_KEYS, build_parser, load_config, resolve_config
from psft_plugin.options import ConfigError
from psft_plugin.registry import default_registry


@pytest.fixture
def paths(tiny):
    model, data = tiny
    return {"model": str(model), "data": str(data), "train": True, "num_layers": -1}


def _problems(values):
    with pytest.raises(ConfigError) as error:
        resolve_config(values)
    return error.value.problems


def test_every_declared_key_has_one_flag_and_psft_flags_come_from_the_registry():
    flags = {action.dest: action for action in build_parser()._actions}
    for key in MLX_KEYS:
        assert (key.key in flags) == key.flag, key.key
    for key, option in default_registry().options().items():
        assert key in flags and option.help in flags[key].help
    assert "loss" in flags


def test_cli_overrides_yaml_and_yaml_floats_parse(tmp_path, paths):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {paths['model']}\ndata: {paths['data']}\ntrain: true\nnum_layers: -1\nlearning_rate: 1e-5\niters: 7\n"
        f"loss: psft\npsft_refresh_steps: 4\nmask_prompt: true\n"
    )
    cfg = load_config(["--config", str(config), "--iters", "3", "--psft-epsilon-high", "0.5", "--no-mask-prompt"])
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.iters == 3 and cfg.mask_prompt is False
    assert cfg.psft["psft_epsilon_high"] == 0.5 and cfg.psft["psft_refresh_steps"] == 4
    assert cfg.settings.objective.name == "psft" and cfg.settings.objective.uses_old_policy
    assert cfg.batch_size == 4 and cfg.lora_parameters == {"rank": 8, "dropout": 0.0, "scale": 20.0}


def test_unknown_keys_are_named_with_the_close_match(paths):
    problems = _problems(
        {**paths, "lerning_rate": 1e-4, "loss": "psft", "psft_epsilon_hihg": 0.3, "lora_parameters": {"rnak": 4}}
    )
    text = "\n".join(problems)
    assert "unknown key `lerning_rate` (did you mean `learning_rate`?)" in text
    assert "unknown key `psft_epsilon_hihg` (did you mean `psft_epsilon_high`?)" in text
    assert "lora_parameters" in text and "`rnak` (did you mean `rank`?)" in text


def test_unknown_loss_lists_the_objectives(paths):
    (problem,) = _problems({**paths, "loss": "pstf"})
    assert "`loss: pstf`" in problem and "did you mean `psft`" in problem and "ce, dft, psft" in problem


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("psft_epsilon_low", 1.5, "< 1.0"),
        ("psft_epsilon_high", -0.1, ">= 0.0"),
        ("psft_refresh_steps", 0, ">= 1"),
        ("psft_refresh_steps", 2.5, "whole number"),
        ("psft_loss_agg", "mean", "token-mean"),
    ],
)
def test_bad_psft_values_are_refused(paths, key, value, words):
    (problem,) = _problems({**paths, "loss": "psft", key: value})
    assert key in problem and words in problem


def test_every_problem_is_reported_at_once(tmp_path):
    problems = _problems(
        {
            "model": str(tmp_path / "nope"),
            "data": str(tmp_path / "nodata"),
            "train": True,
            "batch_size": 0,
            "loss": "psft",
            "psft_refresh_steps": 0,
            "fine_tune_type": "qlora",
        }
    )
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


def test_psft_keys_under_ce_are_an_error_as_in_every_host(paths):
    """One rule in every host (issue 13): with `loss` left out or `loss: ce` written, a PSFT key is an error."""
    (problem,) = _problems({**paths, "psft_refresh_steps": 4})
    assert "psft_refresh_steps" in problem and "set `loss: psft`" in problem and "`loss` is not set" in problem
    (problem,) = _problems({**paths, "loss": "ce", "psft_refresh_steps": 4})
    assert "`psft_refresh_steps` has no effect with `loss: ce`; set `loss: psft` or remove" in problem
    cfg = resolve_config({**paths, "loss": "ce"})
    assert cfg.settings.objective.name == "ce" and cfg.psft == {"psft_loss_agg": "token-mean"}


def test_train_false_needs_test_and_trained_adapters(paths, tmp_path):
    (problem,) = _problems({**paths, "train": False})
    assert "nothing to do" in problem and "`test: true`" in problem and "as in mlx_lm.lora" in problem
    (problem,) = _problems({"model": paths["model"], "data": paths["data"]})  # mlx-lm's defaults: neither
    assert "neither `train` nor `test` is set" in problem
    (problem,) = _problems({**paths, "train": False, "test": True, "adapter_path": str(tmp_path / "none")})
    assert "adapter_config.json or adapters.safetensors" in problem and 'adapter_path: ""' in problem
    cfg = resolve_config({**paths, "train": False, "test": True, "adapter_path": ""})  # the base model
    assert cfg.train is False and cfg.test is True


def test_names_and_sizes_are_read_as_mlx_lm_reads_them(paths):
    cfg = resolve_config(
        {**paths, "optimizer": "AdamW", "clear_cache_threshold": "1GB", "report_to": "WandB", "project_name": "p"}
    )
    assert cfg.optimizer == "adamw" and cfg.clear_cache_threshold == 10**9 and cfg.project_name == "p"
    assert (
        load_config(
            [
                "--model",
                paths["model"],
                "--data",
                paths["data"],
                "--train",
                "--num-layers",
                "-1",
                "--clear-cache-threshold",
                "512MB",
            ]
        ).clear_cache_threshold
        == 512 * 10**6
    )
    text = "\n".join(_problems({**paths, "clear_cache_threshold": "1TB", "report_to": "wandb,tensorbord"}))
    assert "`clear_cache_threshold: '1TB'` is not a size" in text and "1GB" in text
    assert "`tensorbord` is not one of mlx-lm's reporters" in text


def test_nested_keys_are_checked_with_close_matches(paths):
    problems = _problems(
        {
            **paths,
            "lr_schedule": {"name": "cosine_decy", "arguments": [1e-5, 10], "warmpu": 2},
            "optimizer_config": {"adamw": {"weight_decy": 0.1}, "AdamW": {}},
            "lora_parameters": {"rank": 8, "alpha": 16},
            "lora_layers": 4,
            "hf_dataset": {"train_splt": "train"},
        }
    )
    text = "\n".join(problems)
    for words in (
        "in `lr_schedule`: unknown key `warmpu` (did you mean `warmup`?)",
        "`name: cosine_decy` is not an mlx.optimizers.schedulers function (did you mean `cosine_decay`?)",
        "`adamw.weight_decy` is not an argument of mlx.optimizers.AdamW (did you mean `weight_decay`?)",
        "unknown optimizer `AdamW`; write it in lower case, `adamw`",
        "`alpha` is PEFT's name; mlx-lm's LoRA multiplier is `scale`",
        "is `scale: 2`",
        "unknown key `lora_layers`: an older mlx-lm name; use `num_layers`",
        "in `hf_dataset`: unknown key `train_splt` (did you mean `train_split`?)",
        "in `hf_dataset`: `path` is missing",
    ):
        assert words in text, words
    assert len(problems) == 8


def test_broken_yaml_and_data_files_name_the_file_line_and_fix(tmp_path, paths):
    config = tmp_path / "bad.yaml"
    config.write_text("model: x\nlora_parameters: {rank: 8\niters: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(["--config", str(config)])
    assert f"config file `{config}` is not valid YAML" in str(error.value) and "line 3" in str(error.value)
    assert len(error.value.problems) == 1  # not also "no model", "no data": consequences of the same file
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    (data / "valid.jsonl").write_text('{"text": "a"}\n{"text": \n')
    text = "\n".join(_problems({**paths, "data": str(data)}))
    assert "train.jsonl` is empty; it needs one JSON object per line" in text
    assert "valid.jsonl` line 2 is not JSON" in text


def test_the_trainer_modules_import_neither_torch_nor_mlx_lm():
    """mlx-lm (through transformers) may pull torch in where it is installed; our modules never do."""
    import subprocess
    import sys

    code = (
        "import sys, psft_mlx.data, psft_mlx.trainer, psft_plugin.mlx_train.config, psft_plugin.mlx_train.run\n"
        "assert not {'torch', 'mlx_lm', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_torch_only_lm_head_chunk_size_is_rejected_by_name(paths):
    (problem,) = _problems({**paths, "loss": "psft", "psft_lm_head_chunk_size": 64})
    assert "`psft_lm_head_chunk_size: 64` is not supported by the MLX trainer" in problem
    assert "psft_lm_head_chunk_size: -1` is out of range" in _problems({**paths, "psft_lm_head_chunk_size": -1})[0]
    assert resolve_config({**paths, "loss": "ce", "psft_lm_head_chunk_size": 0}).settings.objective.name == "ce"
