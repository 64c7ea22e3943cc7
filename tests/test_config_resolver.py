"""The core configuration resolver (psft_plugin.config.resolve): every shared rule, in every host alike."""

import json
import sys
import textwrap

import pytest

from psft_plugin import ConfigError, Objective, Option, hookimpl
from psft_plugin.config import LOSS_OPTION, resolve
from psft_plugin.registry import ENTRY_POINT_GROUP, ObjectiveRegistry, default_registry, make_plugin_manager
from psft_plugin.spec import AGGREGATIONS


def _problems(config, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as error:
        resolve(config, **kwargs)
    return error.value.problems


def test_str_and_bool_options_accept_their_own_values():
    """Option.problem once said `must be a str` for every str option, its default included."""
    text = Option("x", "a", "m", type=str)
    assert text.problem("a") is None and text.problem("anything") is None
    assert text.problem(3) == "`x: 3` must be a string"
    flag = Option("f", False, "m", type=bool)
    assert flag.problem(True) is None and flag.problem(False) is None
    assert flag.problem("yes") == "`f: 'yes'` must be true or false"
    assert Option("n", 1, "m", type=int).problem(True) == "`n: True` must be an int"
    assert Option("x", "a", "m", type=str).read(None) == ("a", None)


def test_loss_is_an_option_whose_default_is_ce_for_every_host():
    assert LOSS_OPTION.key == "loss" and LOSS_OPTION.default == "ce"
    settings = resolve({})
    assert settings.objective.name == "ce" and settings.resolved == {"psft_loss_agg": "token-mean"}
    assert (settings.refresh_steps, settings.warmup_steps, settings.lm_head_chunk_size) == (1, 0, 0)
    assert _problems({"loss": 3}) == ["`loss: 3` must be a string"]


def test_resolved_settings_hold_the_objective_options_and_the_trainer_options():
    settings = resolve(
        {
            "loss": "psft",
            "psft_refresh_steps": 4,
            "psft_warmup_steps": 2,
            "psft_lm_head_chunk_size": 64,
            "psft_epsilon_high": None,
        }
    )
    assert settings.objective.name == "psft"
    assert settings.resolved == {
        "psft_epsilon_low": 0.2,
        "psft_epsilon_high": 0.28,
        "psft_refresh_steps": 4,
        "psft_warmup_steps": 2,
        "psft_loss_agg": "token-mean",
    }
    assert settings.trainer == {"psft_lm_head_chunk_size": 64} and settings.lm_head_chunk_size == 64
    assert (settings.refresh_steps, settings.warmup_steps) == (4, 2)


def test_unknown_objective_is_named_with_the_closest_one():
    (problem,) = _problems({"loss": "pstf"})
    assert "unknown objective `loss: pstf` (did you mean `psft`?)" in problem and "ce, dft, psft" in problem


def test_unknown_and_misspelt_keys():
    problems = _problems({"loss": "psft", "psft_refresh_step": 4, "refresh_steps": 4, "base_model": "m"})
    assert problems == [
        "unknown key `psft_refresh_step` (did you mean `psft_refresh_steps`?)",
        "unknown key `refresh_steps` (did you mean `psft_refresh_steps`?)",
    ]
    # a key the host reads is the host's, and so is an unknown key closer to one of the host's keys
    resolve({"loss": "psft", "refresh_steps": 4, "warmup_step": 1}, host_keys={"refresh_steps", "warmup_steps"})
    # a closed host (only its keys and ours) has every other key reported
    assert _problems({"base_model": "m"}, closed=True) == ["unknown key `base_model`"]
    assert _problems({"lerning_rate": 1}, host_keys={"learning_rate"}, closed=True) == [
        "unknown key `lerning_rate` (did you mean `learning_rate`?)"
    ]


def test_bad_values_are_reported_together_with_their_bounds():
    problems = _problems(
        {
            "loss": "psft",
            "psft_epsilon_low": 1.5,
            "psft_refresh_steps": 2.5,
            "psft_loss_agg": "mean",
            "psft_epsilon_high": "x",
            "psft_lm_head_chunk_size": -1,
        }
    )
    assert sorted(problems) == sorted(
        [
            "`psft_epsilon_low: 1.5` is out of range; it must be < 1.0",
            "`psft_epsilon_high: 'x'` must be a number",
            "`psft_refresh_steps: 2.5` must be a whole number",
            f"`psft_loss_agg: 'mean'` is not allowed; use one of {', '.join(AGGREGATIONS)}",
            "`psft_lm_head_chunk_size: -1` is out of range; it must be >= 0",
        ]
    )


def test_a_key_the_objective_ignores_is_an_error_naming_the_key_and_the_fix():
    (problem,) = _problems({"loss": "ce", "psft_refresh_steps": 4})
    assert (
        problem == "`psft_refresh_steps` has no effect with `loss: ce`; set `loss: psft` or remove `psft_refresh_steps`"
    )
    (problem,) = _problems({"psft_epsilon_high": 0.3})
    assert problem.startswith("`psft_epsilon_high` has no effect with `loss: ce`; set `loss: psft`")
    assert problem.endswith("(`loss` is not set; its default is `ce`)")
    assert resolve({"loss": "ce", "psft_lm_head_chunk_size": 8}).lm_head_chunk_size == 8  # read by every objective


def test_host_problems_are_reported_with_the_rest():
    problems = _problems({"loss": "psft", "psft_refresh_steps": 0}, host_problems=["`rl: dpo` is not supported"])
    assert problems == ["`psft_refresh_steps: 0` is out of range; it must be >= 1", "`rl: dpo` is not supported"]
    assert _problems({}, host_problems=["no model"]) == ["no model"]


@hookimpl
def psft_plugin_objectives():
    return [
        Objective(
            name="my-loss",
            description="a third-party objective",
            implementations={"numpy": "psft_plugin.spec:ce_loss"},
            options=(Option("my_loss_temperature", 1.0, "a knob", loss_arg="temperature", gt=0.0),),
        )
    ]


def test_third_party_option_keys_are_checked_like_ours():
    manager = make_plugin_manager(load_entry_points=False)
    manager.register(sys.modules[__name__], name="my-loss")
    registry = ObjectiveRegistry(manager)
    assert resolve({"loss": "my-loss", "my_loss_temperature": 2.0}, registry=registry).resolved == {
        "my_loss_temperature": 2.0
    }
    assert _problems({"loss": "my-loss", "my_loss_temprature": 2.0}, registry=registry) == [
        "unknown key `my_loss_temprature` (did you mean `my_loss_temperature`?)"
    ]
    assert _problems({"loss": "my-loss", "my_loss_temperature": 0}, registry=registry) == [
        "`my_loss_temperature: 0` is out of range; it must be > 0.0"
    ]
    assert _problems({"loss": "psft", "my_loss_temperature": 2.0}, registry=registry) == [
        "`my_loss_temperature` has no effect with `loss: psft`; set `loss: my-loss` or remove `my_loss_temperature`"
    ]


# ----- one rule across hosts: the same mapping gives the same problems in Axolotl, the mixin and MLX -----


def _host_problems(config: dict, tmp_path) -> dict[str, list[str]]:
    """The problems each host reports for ``config`` (MLX: with a valid model and data folder)."""
    from psft_plugin.integrations.axolotl.args import config_problems
    from psft_plugin.mlx_train.config import resolve_config
    from psft_torch.trainer import PSFTSettings

    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir(exist_ok=True)
    data.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (data / "train.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
    found = {"axolotl": config_problems(config, host_keys=())}
    for host, check in (
        ("torch mixin", PSFTSettings.from_config),
        ("mlx", lambda c: resolve_config({"model": str(model), "data": str(data), "train": True, **c})),
    ):
        try:
            check(config)
            found[host] = []
        except ConfigError as error:
            found[host] = error.problems
    return found


@pytest.mark.parametrize(
    "config",
    [
        {"loss": "psft", "psft_refresh_steps": 4},
        {"loss": "ce", "psft_refresh_steps": 4},
        {"psft_epsilon_low": 1.5, "psft_refresh_step": 3},
        {"loss": "pstf", "psft_loss_agg": "sum"},
        {"loss": "psft", "refresh_steps": 4, "psft_epsilon_high": -1},
    ],
)
def test_every_host_reports_the_same_core_problems(config, tmp_path):
    found = _host_problems(config, tmp_path)
    try:
        resolve(config)
        expected = []
    except ConfigError as error:
        expected = error.problems
    assert found == {"axolotl": expected, "torch mixin": expected, "mlx": expected}
    assert bool(expected) == (config != {"loss": "psft", "psft_refresh_steps": 4})


TOY_SOURCE = """
    from psft_plugin import Objective, Option, hookimpl

    @hookimpl
    def psft_plugin_objectives():
        return [Objective(name="my-loss", description="a third-party objective",
                          implementations={"numpy": "psft_plugin.spec:ce_loss"},
                          options=(Option("my_loss_temperature", 1.0, "a knob", loss_arg="temperature", gt=0.0),))]
"""


def test_a_third_party_typo_is_caught_by_every_host(tmp_path, monkeypatch):
    """The README's `my_loss_temperature`, installed through the entry-point group and misspelt."""
    (tmp_path / "my_objective.py").write_text(textwrap.dedent(TOY_SOURCE))
    info = tmp_path / "my_objective-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-objective\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nmy-loss = my_objective\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    default_registry.cache_clear()
    try:
        found = _host_problems({"loss": "my-loss", "my_loss_temprature": 2.0}, tmp_path)
    finally:
        default_registry.cache_clear()
        sys.modules.pop("my_objective", None)
    expected = ["unknown key `my_loss_temprature` (did you mean `my_loss_temperature`?)"]
    assert found == {"axolotl": expected, "torch mixin": expected, "mlx": expected}
