"""The plugin's YAML validation, through Axolotl's own config loader (``load_cfg``, in process)."""

from pathlib import Path

import pytest
import yaml

from axolotl_runs import config

PLUGIN = "psft_plugin.integrations.axolotl.PSFTPlugin"


@pytest.fixture
def load(tiny_assets, tmp_path):
    """``load(**overrides)``: Axolotl's validated config of the tiny YAML with ``overrides``."""
    from axolotl.cli.config import load_cfg

    def _load(**overrides):
        cfg = config(*tiny_assets, tmp_path, **overrides)
        path = tmp_path / "cfg.yml"
        path.write_text(yaml.safe_dump(cfg))
        return load_cfg(str(path))

    return _load


def _message(excinfo) -> str:
    return str(excinfo.value)


def test_the_shipped_tiny_config_validates_with_its_values(load):
    cfg = load()
    assert cfg.loss == "psft" and cfg.psft_refresh_steps == 4 and cfg.psft_epsilon_high == 0.28


def test_unknown_objective_lists_the_registered_ones(load):
    with pytest.raises(Exception) as excinfo:
        load(loss="psfy")
    assert "unknown objective `loss: psfy` (did you mean `psft`?)" in _message(excinfo)
    assert "ce, psft" in _message(excinfo)


@pytest.mark.parametrize("key, value, expected", [
    ("psft_epsilon_high", -0.1, "`psft_epsilon_high: -0.1` is out of range; it must be >= 0.0"),
    ("psft_epsilon_low", 1.0, "`psft_epsilon_low: 1.0` is out of range; it must be < 1.0"),
    ("psft_refresh_steps", 0, "`psft_refresh_steps: 0` is out of range; it must be >= 1"),
    ("psft_loss_agg", "mean", "`psft_loss_agg: 'mean'` is not allowed"),
])
def test_out_of_range_values_name_the_key_and_the_bound(load, key, value, expected):
    with pytest.raises(Exception) as excinfo:
        load(**{key: value})
    assert expected in _message(excinfo)


def test_a_misspelt_psft_key_is_an_error_with_a_suggestion(load):
    with pytest.raises(Exception) as excinfo:
        load(psft_refresh_step=4, psft_epsilon_hihg=0.3)
    message = _message(excinfo)
    assert "unknown key `psft_refresh_step` (did you mean `psft_refresh_steps`?)" in message
    assert "unknown key `psft_epsilon_hihg` (did you mean `psft_epsilon_high`?)" in message


def test_psft_keys_without_loss_psft_are_an_error(load):
    """Forgetting `loss: psft` would train CE with the PSFT keys ignored."""
    with pytest.raises(Exception) as excinfo:
        load(loss=None)
    assert "`psft_refresh_steps` has no effect with `loss: ce`; set `loss: psft`" in _message(excinfo)


@pytest.mark.parametrize("overrides, key", [
    ({"rl": "dpo"}, "rl"),
    ({"reward_model": True}, "reward_model"),
    ({"orpo_alpha": 0.1}, "orpo_alpha"),
    ({"cut_cross_entropy": True}, "cut_cross_entropy"),
    ({"liger_fused_linear_cross_entropy": True}, "liger_fused_linear_cross_entropy"),
    ({"context_parallel_size": 2}, "context_parallel_size"),
])
def test_modes_psft_cannot_run_in_are_rejected(load, overrides, key):
    with pytest.raises(Exception) as excinfo:
        load(**overrides)
    assert f"`loss: psft` cannot run with `{key}`" in _message(excinfo)


def test_trainer_choice(load):
    from axolotl.core.trainers.base import AxolotlTrainer

    from psft_plugin.integrations.axolotl import PSFTPlugin
    from psft_plugin.integrations.axolotl.trainer import AxolotlPSFTTrainer

    plugin = PSFTPlugin()
    assert plugin.get_trainer_cls(load()) is AxolotlPSFTTrainer
    assert issubclass(AxolotlPSFTTrainer, AxolotlTrainer)
    ce_only = {k: None for k in ("psft_epsilon_low", "psft_epsilon_high", "psft_refresh_steps", "psft_warmup_steps")}
    assert plugin.get_trainer_cls(load(loss="ce", **ce_only)) is AxolotlPSFTTrainer
    # plain CE in a mode the mixin does not host keeps Axolotl's trainer
    assert plugin.get_trainer_cls(load(loss="ce", orpo_alpha=0.1, **ce_only)) is None


def test_without_the_plugins_line_axolotl_drops_loss_silently(load):
    """The known hole (docs/axolotl.md): Axolotl 0.19 only imports listed plugins and drops
    unknown keys, so a bare `loss: psft` is lost. If Axolotl ever keeps or rejects it, this
    test fails and the docs should be updated."""
    cfg = load(plugins=None)
    assert "loss" not in cfg and "psft_refresh_steps" not in cfg


@pytest.mark.parametrize("name", ["tiny.yml", "qwen2.5-7b-lora.yml"])
def test_shipped_configs_pass_the_plugin_checks_and_list_the_plugin(name):
    from psft_plugin.integrations.axolotl.args import config_problems

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "axolotl" / name).read_text())
    assert config_problems(cfg) == []
    assert cfg["loss"] == "psft" and cfg["plugins"] == [PLUGIN]


def test_docs_options_table_matches_the_declarations():
    from psft_plugin.objectives import PSFT_OPTIONS
    from psft_plugin.options import markdown_table

    text = (Path(__file__).resolve().parents[2] / "docs" / "axolotl.md").read_text()
    table = text.split("<!-- options-table -->\n", 1)[1].split("\n<!-- /options-table -->", 1)[0]
    assert table == markdown_table(PSFT_OPTIONS)
