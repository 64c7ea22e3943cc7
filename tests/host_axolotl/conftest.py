"""Axolotl tests: every test starts with a fresh Axolotl plugin manager (and, from tests/conftest.py, the same environment).

``axolotl.integrations.base.PluginManager`` is a process-wide singleton that keeps every plugin
registered so far, and Axolotl 0.21 merges all of their args models into each later config. An
in-process test would otherwise see the plugins (and the validators) of the tests before it.

Validating a config in-process also writes the accelerate settings it implies into
``os.environ`` (an FSDP config sets ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables), and
every ``axolotl train`` launched later inherits them: a ZeRO run then trained under FSDP2.
"""

import pytest


@pytest.fixture(autouse=True)
def fresh_axolotl_plugin_manager():
    from axolotl.integrations import base

    def reset():
        base.PluginManager._instance = None
        if hasattr(base, "reset_plugin_entry_points_cache"):  # 0.21: entry points are cached
            base.reset_plugin_entry_points_cache()

    reset()
    yield
    reset()
