"""The pluggy objective registry: built-ins, entry-point discovery, clear errors."""

import sys
import textwrap

import pytest

from psft_plugin import ConfigError, UnknownObjectiveError, get_objective
from psft_plugin.registry import ENTRY_POINT_GROUP, ObjectivePluginError, ObjectiveRegistry, make_plugin_manager


def test_builtins_are_registered_and_loadable_per_backend():
    registry = ObjectiveRegistry(make_plugin_manager(load_entry_points=False))
    assert registry.names() == ["ce", "dft", "psft"]
    psft = registry.get("psft")
    assert psft.uses_old_policy and not registry.get("ce").uses_old_policy and not registry.get("dft").uses_old_policy
    from psft_plugin.spec import dft_loss, psft_loss

    assert psft.loss_fn("numpy") is psft_loss and registry.get("dft").loss_fn("numpy") is dft_loss
    assert [o.key for o in registry.get("dft").options] == ["psft_loss_agg"]
    assert {"psft_epsilon_low", "psft_refresh_steps", "psft_loss_agg"} <= registry.options().keys()


def test_builtins_are_declared_in_the_entry_point_group():
    from importlib import metadata

    names = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert {"ce", "psft"} <= names
    assert get_objective("psft").name == "psft"  # loading the group does not register them twice


def test_every_builtin_is_declared_in_pyproject_like_a_third_party_objective():
    """The installed metadata may predate a new built-in; the source of the entry points is pyproject.toml."""
    from pathlib import Path

    import tomllib

    from psft_plugin.objectives import BUILTIN_PLUGINS

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert declared == {name: f"psft_plugin.objectives:{name}" for name in BUILTIN_PLUGINS}


def test_unknown_objective_lists_the_registered_ones():
    with pytest.raises(UnknownObjectiveError) as error:
        get_objective("pfst")
    message = str(error.value)
    assert "did you mean `psft`" in message and "ce, dft, psft" in message and ENTRY_POINT_GROUP in message


def test_options_resolve_with_defaults_and_report_every_problem():
    psft = get_objective("psft")
    resolved = psft.resolve({"psft_epsilon_high": 0.3})
    assert resolved == {
        "psft_epsilon_low": 0.2,
        "psft_epsilon_high": 0.3,
        "psft_refresh_steps": 8,
        "psft_warmup_steps": 0,
        "psft_loss_agg": "token-mean",
    }
    assert psft.loss_kwargs(resolved) == {"epsilon_low": 0.2, "epsilon_high": 0.3, "agg": "token-mean"}
    with pytest.raises(ConfigError) as error:
        psft.resolve({"psft_epsilon_low": 1.5, "psft_refresh_steps": 0, "psft_loss_agg": "sum"})
    assert len(error.value.problems) == 3
    assert "psft_epsilon_low" in str(error.value) and "psft_refresh_steps" in str(error.value)


def _install_toy_distribution(root, entry_point: str, module_source: str, module: str = "toy_objective") -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_point}\n")


TOY_SOURCE = """
    from psft_plugin import Objective, hookimpl

    def doubled_ce(logp, old_logp, mask, *, num_tokens=None):
        tokens = mask.sum()
        return float((-2 * logp * mask).sum() / tokens), {"tokens": float(tokens)}

    @hookimpl
    def psft_plugin_objectives():
        return [Objective(name="toy", description="twice the CE",
                          implementations={"numpy": "toy_objective:doubled_ce"})]
"""


def test_third_party_objective_is_found_through_its_entry_point(tmp_path, monkeypatch):
    _install_toy_distribution(tmp_path, "toy = toy_objective", TOY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry = ObjectiveRegistry(make_plugin_manager())
        toy = registry.get("toy")
        import numpy as np

        loss, _ = toy.loss_fn("numpy")(np.log(np.array([[0.5]])), None, np.ones((1, 1)))
        assert loss == pytest.approx(-2 * np.log(0.5))
        with pytest.raises(NotImplementedError, match="no `torch` implementation"):
            toy.loss_fn("torch")
    finally:
        sys.modules.pop("toy_objective", None)


def test_a_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch):
    _install_toy_distribution(tmp_path, "toy = toy_objective", "import not_a_real_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ObjectivePluginError, match=r"toy = toy_objective.*toy-objective"):
        make_plugin_manager()
    sys.modules.pop("toy_objective", None)


def test_duplicate_objective_names_are_rejected(tmp_path, monkeypatch):
    source = TOY_SOURCE.replace('name="toy"', 'name="psft"')
    _install_toy_distribution(tmp_path, "toy = toy_objective", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ObjectivePluginError, match="`psft` is registered twice"):
            ObjectiveRegistry(make_plugin_manager())
    finally:
        sys.modules.pop("toy_objective", None)


@pytest.mark.parametrize("name", ["ce", "psft", "dft"])
def test_an_entry_point_taking_a_builtin_name_is_an_error(tmp_path, monkeypatch, name):
    """Before: skipped without a word, so the third-party objective silently never loaded."""
    _install_toy_distribution(tmp_path, f"{name} = toy_objective", TOY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ObjectivePluginError) as error:
            make_plugin_manager()
        message = str(error.value)
        assert f"`{name} = toy_objective` (from toy-objective)" in message
        assert f"takes the name `{name}` of the built-in objective plugin `psft_plugin.objectives:{name}`" in message
        assert "rename the entry point" in message
        assert "toy_objective" not in sys.modules  # refused before anything of it is imported
    finally:
        sys.modules.pop("toy_objective", None)


def test_two_entry_points_with_one_name_are_an_error(tmp_path, monkeypatch):
    for folder, module in (("a", "toy_objective"), ("b", "other_objective")):
        (tmp_path / folder).mkdir()
        _install_toy_distribution(tmp_path / folder, f"toy = {module}", TOY_SOURCE, module=module)
        monkeypatch.syspath_prepend(str(tmp_path / folder))
    try:
        with pytest.raises(ObjectivePluginError) as error:
            make_plugin_manager()
        message = str(error.value)
        assert "takes the name `toy` of" in message
        assert "`toy = toy_objective` (from toy-objective)" in message
        assert "`toy = other_objective` (from other-objective)" in message
    finally:
        sys.modules.pop("toy_objective", None)
        sys.modules.pop("other_objective", None)


@pytest.mark.parametrize(
    "key, value",
    [("psft_epsilon_low", v) for v in (-0.1, 0.0, 0.99, 1.0)] + [("psft_epsilon_high", v) for v in (-0.1, 0.0, 5.0)],
)
def test_the_epsilon_options_and_the_spec_accept_the_same_values(key, value):
    """One declaration of the bounds: a value the YAML accepts never fails inside the loss, and the reverse."""
    from psft_plugin.spec import check_hyperparameters

    option = {o.key: o for o in get_objective("psft").options}[key]
    epsilons = {"epsilon_low": 0.2, "epsilon_high": 0.28, option.loss_arg: value}
    try:
        check_hyperparameters(epsilons["epsilon_low"], epsilons["epsilon_high"], "token-mean", None)
        spec_accepts = True
    except ValueError:
        spec_accepts = False
    assert (option.problem(value) is None) == spec_accepts
