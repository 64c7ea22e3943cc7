"""The plugin's YAML validation, through Axolotl's own config loader (``load_cfg``, in process).

On Axolotl 0.21 every check runs twice: with the ``plugins:`` line and without it (the plugin is
loaded from the ``axolotl.plugins`` entry point). Axolotl 0.19 only knows the listed form.
"""

from pathlib import Path

import pytest
import yaml
from axolotl_runs import config

from psft_plugin.integrations.axolotl.args import CONFLICTS

PLUGIN = "psft_plugin.integrations.axolotl.PSFTPlugin"


PSFT_ONLY_KEYS = ("psft_epsilon_low", "psft_epsilon_high", "psft_refresh_steps", "psft_warmup_steps", "psft_loss_agg")
NOT_OURS = {"loss": None, **{key: None for key in PSFT_ONLY_KEYS}}


@pytest.fixture(params=["listed", pytest.param("bare", marks=pytest.mark.axolotl_line("0.21"))])
def load(request, tiny_assets, tmp_path):
    """``load(**overrides)``: Axolotl's validated config of the tiny YAML with ``overrides``,
    with the ``plugins:`` line (``listed``) or without it (``bare``, Axolotl 0.21 only)."""
    from axolotl.cli.config import load_cfg

    form = {} if request.param == "listed" else {"plugins": None}

    def _load(**overrides):
        cfg = config(*tiny_assets, tmp_path, **{**form, **overrides})
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
    assert "ce, dft, psft" in _message(excinfo)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("psft_epsilon_high", -0.1, "`psft_epsilon_high: -0.1` is out of range; it must be >= 0.0"),
        ("psft_epsilon_low", 1.0, "`psft_epsilon_low: 1.0` is out of range; it must be < 1.0"),
        ("psft_refresh_steps", 0, "`psft_refresh_steps: 0` is out of range; it must be >= 1"),
        ("psft_loss_agg", "mean", "`psft_loss_agg: 'mean'` is not allowed"),
    ],
)
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


def test_a_key_closer_to_an_option_than_to_any_axolotl_key_is_a_typo(load):
    """`refresh_steps` (prefix forgotten) is no Axolotl key: reported. `warmup_steps` is Axolotl's: left alone,
    though it is as close to `psft_warmup_steps` (the resolver is handed Axolotl's merged config model's keys)."""
    from psft_plugin.integrations.axolotl.args import config_problems

    with pytest.raises(Exception) as excinfo:
        load(refresh_steps=4)
    assert "unknown key `refresh_steps` (did you mean `psft_refresh_steps`?)" in _message(excinfo)
    assert load(warmup_steps=2).warmup_steps == 2
    assert config_problems({"loss": "psft", "warmup_steps": 2}) == []
    assert config_problems({"loss": "psft", "warmup_steps": 2}, host_keys=()) == [
        "unknown key `warmup_steps` (did you mean `psft_warmup_steps`?)"
    ]


def test_psft_keys_without_loss_psft_are_an_error(load):
    """Forgetting `loss: psft` would train CE with the PSFT keys ignored."""
    with pytest.raises(Exception) as excinfo:
        load(loss=None)
    assert "`psft_refresh_steps` has no effect with `loss: ce`; set `loss: psft`" in _message(excinfo)


def test_a_config_without_our_keys_validates_as_without_the_plugin(load):
    """Loaded for every config on 0.21, the plugin adds no key to a config that does not ask for it."""
    cfg = load(**NOT_OURS)
    assert "loss" not in cfg and not [key for key in cfg if key.startswith("psft_")]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"rl": "dpo"}, "rl"),
        ({"reward_model": True}, "reward_model"),
        ({"orpo_alpha": 0.1}, "orpo_alpha"),
        ({"cut_cross_entropy": True}, "cut_cross_entropy"),
        ({"liger_fused_linear_cross_entropy": True}, "liger_fused_linear_cross_entropy"),
        ({"use_dft": True}, "use_dft"),
        ({"chunked_cross_entropy": True}, "chunked_cross_entropy"),
        ({"context_parallel_size": 2}, "context_parallel_size"),
        ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
    ],
)
def test_modes_psft_cannot_run_in_are_rejected(load, overrides, key):
    with pytest.raises(Exception) as excinfo:
        load(**overrides)
    assert f"`loss: psft` cannot run with `{key}`" in _message(excinfo)


@pytest.mark.parametrize("key", [key for conflict in CONFLICTS for key in conflict.keys])
def test_every_setting_with_its_own_loss_or_trainer_is_refused_with_its_key_and_fix(key):
    """Each declared conflict, for every non-CE objective (checked before Axolotl loads the model)."""
    from psft_plugin.integrations.axolotl.args import config_problems

    conflict = next(conflict for conflict in CONFLICTS if key in conflict.keys)
    for loss in ("psft", "dft"):
        problems = config_problems({"loss": loss, key: 2 if conflict.degree else True}, host_keys={key})
        assert problems == [f"`loss: {loss}` cannot run with `{key}`: {conflict.why}; {conflict.fix.format(key=key)}"]
    assert config_problems({"loss": "psft", key: 1 if conflict.degree else False}, host_keys={key}) == []


def test_axolotl_dft_beside_loss_names_the_key_and_the_plugin_objective(load):
    with pytest.raises(Exception) as excinfo:
        load(use_dft=True, **{**NOT_OURS, "loss": "dft"})
    assert "`loss: dft` cannot run with `use_dft`: Axolotl's DFT installs its own loss function; " in _message(excinfo)
    assert "remove `use_dft`; `loss: dft` trains the same objective" in _message(excinfo)


@pytest.mark.parametrize(
    "key", ["chunked_cross_entropy", pytest.param("use_dft", marks=pytest.mark.axolotl_line("0.21"))]
)
def test_plain_ce_with_a_setting_that_brings_its_own_loss_keeps_axolotls_trainer(load, key):
    """`loss: ce` (the plugin's default) steps aside: Axolotl's chunked CE or DFT (0.21) trains as without the plugin."""
    from psft_plugin.integrations.axolotl import PSFTPlugin

    assert PSFTPlugin().get_trainer_cls(load(**{**NOT_OURS, "loss": "ce", key: True})) is None


def test_docs_conflicts_table_matches_the_declarations():
    from psft_plugin.integrations.axolotl.args import conflicts_table

    text = (Path(__file__).resolve().parents[2] / "docs" / "axolotl.md").read_text()
    table = text.split("<!-- conflicts-table -->\n", 1)[1].split("\n<!-- /conflicts-table -->", 1)[0]
    assert table == conflicts_table()


def test_objective_names_are_suggested_whatever_their_case(load):
    with pytest.raises(Exception) as excinfo:
        load(loss="PSFT")
    assert "unknown objective `loss: PSFT` (did you mean `psft`?)" in _message(excinfo)


def test_the_start_up_line_names_the_window_only_for_an_objective_with_an_old_policy():
    from psft_plugin.config import resolve

    psft = resolve({"loss": "psft", "psft_refresh_steps": 4, "psft_warmup_steps": 2}).summary()
    assert psft.startswith("loss=psft (psft_epsilon_low=0.2, psft_epsilon_high=0.28")
    assert psft.endswith(", refresh every 4 optimizer steps after 2 warm-up steps")
    for name in ("ce", "dft"):
        summary = resolve({"loss": name}).summary()
        assert summary.startswith(f"loss={name}") and "refresh" not in summary and "warm-up" not in summary


def test_building_the_args_model_waits_for_axolotl_to_ask():
    """Importing the plugin's args module loads no objective entry point; Axolotl's import of `PSFTArgs` does."""
    import importlib

    from psft_plugin import registry
    from psft_plugin.integrations.axolotl import args

    registry.default_registry.cache_clear()
    importlib.reload(args)  # runs the module's body again, as a fresh import would
    assert registry.default_registry.cache_info().currsize == 0
    assert "loss" in args.PSFTArgs.model_fields and registry.default_registry.cache_info().currsize == 1


def test_trainer_choice(load):
    from psft_plugin.integrations.axolotl import PSFTPlugin
    from psft_plugin.integrations.axolotl.trainer import AxolotlPSFTTrainer

    plugin = PSFTPlugin()
    assert plugin.get_trainer_cls(load()) is AxolotlPSFTTrainer
    ce_only = {**NOT_OURS, "loss": "ce"}
    assert plugin.get_trainer_cls(load(**ce_only)) is AxolotlPSFTTrainer
    # plain CE in a mode the mixin does not host keeps Axolotl's trainer
    assert plugin.get_trainer_cls(load(orpo_alpha=0.1, **ce_only)) is None
    # a config that does not ask for the plugin keeps Axolotl's trainer
    assert plugin.get_trainer_cls(load(**NOT_OURS)) is None


@pytest.mark.axolotl_line("0.21")
def test_listing_the_plugin_as_well_registers_it_once(tiny_assets, tmp_path):
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    from psft_plugin.integrations.axolotl import PSFTPlugin

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(config(*tiny_assets, tmp_path)))
    assert load_cfg(str(path)).plugins == [PLUGIN]
    plugins = PluginManager.get_instance().plugins.values()
    assert sum(isinstance(plugin, PSFTPlugin) for plugin in plugins) == 1


@pytest.mark.axolotl_line("0.21")
def test_without_the_plugins_line_the_entry_point_keeps_loss(tiny_assets, tmp_path):
    from axolotl.cli.config import load_cfg

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(config(*tiny_assets, tmp_path, plugins=None)))
    cfg = load_cfg(str(path))
    assert "plugins" not in cfg and cfg.loss == "psft" and cfg.psft_refresh_steps == 4


@pytest.mark.axolotl_line("0.19")
def test_without_the_plugins_line_axolotl_drops_loss_silently(load):
    """The known hole of the 0.19 line (docs/axolotl.md): Axolotl 0.19 only imports listed plugins
    and drops unknown keys, so a bare `loss: psft` is lost. If that ever changes, this test fails
    and the docs should be updated."""
    cfg = load(plugins=None)
    assert "loss" not in cfg and "psft_refresh_steps" not in cfg


SHIPPED = sorted(path.name for path in (Path(__file__).resolve().parents[2] / "configs" / "axolotl").glob("*.yml"))


def test_every_shipped_config_is_checked():
    assert {"tiny.yml", "qwen2.5-7b-lora.yml", "qwen2.5-7b-fsdp2.yml", "qwen2.5-7b-zero3.yml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_pass_the_plugin_checks_and_list_the_plugin(name):
    """Listing the plugin makes a config work on both lines (0.19 needs the line)."""
    from psft_plugin.integrations.axolotl.args import config_problems

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "axolotl" / name).read_text())
    assert config_problems(cfg) == []
    assert cfg["loss"] == "psft" and cfg["plugins"] == [PLUGIN]


def test_docs_options_table_matches_the_declarations():
    from psft_plugin.objectives import PSFT_OPTIONS, TRAINER_OPTIONS
    from psft_plugin.options import markdown_table

    text = (Path(__file__).resolve().parents[2] / "docs" / "axolotl.md").read_text()
    table = text.split("<!-- options-table -->\n", 1)[1].split("\n<!-- /options-table -->", 1)[0]
    assert table == markdown_table(PSFT_OPTIONS + TRAINER_OPTIONS)


@pytest.mark.parametrize("key", ["cut_cross_entropy", "liger_fused_linear_cross_entropy"])
def test_fused_kernels_still_stop_psft_and_name_the_chunked_lm_head(load, key):
    with pytest.raises(Exception) as excinfo:
        load(**{key: True})
    assert f"`loss: psft` cannot run with `{key}`" in _message(excinfo)
    assert "get the memory back with `psft_lm_head_chunk_size: 1024`" in _message(excinfo)


def test_lm_head_chunk_size_is_read_with_every_objective_and_validated(load):
    from psft_plugin.integrations.axolotl import trainer_config

    ce_only = {k: None for k in ("psft_epsilon_low", "psft_epsilon_high", "psft_refresh_steps", "psft_warmup_steps")}
    assert load(psft_lm_head_chunk_size=256).psft_lm_head_chunk_size == 256
    cfg = load(loss="ce", psft_lm_head_chunk_size=256, **ce_only)  # not "has no effect with `loss: ce`"
    assert trainer_config(cfg)["loss"] == "ce" and trainer_config(cfg)["psft_lm_head_chunk_size"] == 256
    with pytest.raises(Exception) as excinfo:
        load(psft_lm_head_chunk_size=-1)
    assert "`psft_lm_head_chunk_size: -1` is out of range; it must be >= 0" in _message(excinfo)
    with pytest.raises(Exception) as excinfo:  # CE with CCE keeps Axolotl's trainer, which would ignore the key
        load(loss="ce", cut_cross_entropy=True, psft_lm_head_chunk_size=256, **ce_only)
    assert "`psft_lm_head_chunk_size: 256` cannot be combined with `cut_cross_entropy`" in _message(excinfo)


def test_the_chunked_lm_head_is_accepted_under_fsdp2(load):
    cfg = load(
        psft_lm_head_chunk_size=64,
        fsdp_version=2,
        fsdp_config={"transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "state_dict_type": "FULL_STATE_DICT"},
    )
    assert cfg["psft_lm_head_chunk_size"] == 64 and cfg["fsdp_version"] == 2
