"""Hook specifications of the ``psft_plugin`` objective registry (pluggy).

A plugin is any module or object with functions marked ``@hookimpl``; it is registered either
directly (the built-ins) or through the ``psft_plugin.objectives`` entry-point group. Hooks are
called by keyword, so adding a parameter to a spec later breaks no implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import pluggy

PROJECT_NAME = "psft_plugin"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

if TYPE_CHECKING:
    from psft_plugin.objective import Objective


@hookspec
def psft_plugin_objectives() -> Sequence["Objective"]:
    """Return the training objectives this plugin provides.

    Each :class:`psft_plugin.objective.Objective` names itself, declares its YAML options
    (with defaults and bounds) and maps backend names (``numpy``, ``torch``, ``mlx``) to the
    ``"module:function"`` implementing its loss. Names must be unique across plugins.
    """
