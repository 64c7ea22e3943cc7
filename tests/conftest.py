"""Shared test settings (single-threaded, offline, no telemetry, no MLX JIT), the tiny assets and
the selection of tests by Axolotl release line.

The suite runs on two lines (Axolotl 0.21 on Python 3.12, 0.19 on Python 3.11; see the Makefile).
A test that only holds on some lines is marked ``@pytest.mark.axolotl_line("0.21")``; on the
other lines it is deselected (reported in the header and the summary), never skipped.
"""

import os
from importlib import metadata

import pytest
from suite_env import SUITE_ENV

from psft_plugin.assets import tiny

for key, value in SUITE_ENV.items():  # for a bare `pytest` too (make puts the same in front of it)
    os.environ.setdefault(key, value)


@pytest.fixture(autouse=True)
def unchanged_environment():
    """Restore ``os.environ`` after each test, whatever the code under test wrote into it: hosts'
    entry points set variables in-process (Axolotl's accelerate settings, psft-swift's and
    psft-llamafactory's configuration), and a CLI launched later would inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """``(model_dir, data_dir)`` of the offline tiny Llama and its chat data, built once per session."""
    return tiny.build(tmp_path_factory.mktemp("tiny"))


def axolotl_line() -> str:
    """``"0.21"`` etc.: the installed Axolotl's major.minor, or ``"none"``."""
    try:
        return ".".join(metadata.version("axolotl").split(".")[:2])
    except metadata.PackageNotFoundError:
        return "none"


def pytest_report_header(config):
    return f"axolotl line: {axolotl_line()}"


def installed(distribution: str) -> bool:
    """Whether ``distribution`` (e.g. ``"ms-swift"``) is installed in this venv."""
    try:
        metadata.version(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


def pytest_collection_modifyitems(config, items):
    line = axolotl_line()
    other_line = [
        item
        for item in items
        if (marker := item.get_closest_marker("axolotl_line"))
        and line not in marker.args
        or (marker := item.get_closest_marker("requires"))
        and not all(installed(name) for name in marker.args)
    ]
    if other_line:
        config.hook.pytest_deselected(items=other_line)
        items[:] = [item for item in items if item not in other_line]


@pytest.fixture
def register_objective(monkeypatch):
    """``register(*objectives)``: install objectives as a third-party plugin object would, for one test.

    The process-wide registry (:func:`psft_plugin.registry.default_registry`, which every host
    asks) is rebuilt with the plugin registered in pluggy beside the built-ins, and rebuilt
    without it afterwards.
    """
    from psft_plugin import hookimpl, registry

    plugins, make_manager = [], registry.make_plugin_manager

    def manager(load_entry_points: bool = True):
        built = make_manager(load_entry_points)
        for index, plugin in enumerate(plugins):
            built.register(plugin, name=f"test-objectives-{index}")
        return built

    def register(*objectives):
        class Plugin:
            @hookimpl
            def psft_plugin_objectives(self):
                return list(objectives)

        plugins.append(Plugin())
        registry.default_registry.cache_clear()

    monkeypatch.setattr(registry, "make_plugin_manager", manager)
    yield register
    registry.default_registry.cache_clear()
