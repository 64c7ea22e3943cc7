"""The objective registry: a pluggy plugin manager that hosts query by objective name.

Built-in objectives are registered directly; third-party ones come from the entry-point group
``psft_plugin.objectives`` (the built-ins are declared there too, and are not loaded twice). An
entry point that takes a built-in's name (``ce``, ``psft``, ``dft``) or another entry point's is an
error naming both, never silently skipped.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Optional

import pluggy

from psft_plugin import hookspecs, objectives
from psft_plugin.objective import Objective
from psft_plugin.objectives import BUILTIN_PLUGINS, TRAINER_OPTIONS
from psft_plugin.options import Option, suggest

ENTRY_POINT_GROUP = "psft_plugin.objectives"


class UnknownObjectiveError(KeyError):
    """``loss:`` names an objective nobody registered."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class ObjectivePluginError(ImportError):
    """A plugin in the entry-point group failed to import or declared a clashing objective."""


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the hook specs, the built-ins and (optionally) the entry points."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for name, plugin in BUILTIN_PLUGINS.items():
        manager.register(plugin, name=name)
    if load_entry_points:
        _load_entry_points(manager)
    manager.check_pending()
    return manager


def _dist(entry_point: metadata.EntryPoint) -> str:
    """The name of the distribution that declares ``entry_point``."""
    return entry_point.dist.name if entry_point.dist else "unknown distribution"


def _describe(entry_point: metadata.EntryPoint) -> str:
    """```name = module:attr` (from dist-name)``, for error messages."""
    return f"`{entry_point.name} = {entry_point.value}` (from {_dist(entry_point)})"


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    """Register every plugin of the entry-point group, naming the culprit when one fails or clashes.

    The built-ins' own declarations (``ce = psft_plugin.objectives:ce``) are skipped: they are
    registered already. Any other entry point whose name is taken raises, naming both.
    """
    loaded: dict[str, metadata.EntryPoint] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        name, builtin = entry_point.name, f"{objectives.__name__}:{entry_point.name}"
        if name in BUILTIN_PLUGINS and entry_point.value == builtin:
            continue
        if name in BUILTIN_PLUGINS or name in loaded:
            taken = f"the built-in objective plugin `{builtin}`" if name in BUILTIN_PLUGINS else _describe(loaded[name])
            raise ObjectivePluginError(
                f"objective plugin {_describe(entry_point)} in entry-point group {ENTRY_POINT_GROUP} takes the "
                f"name `{name}` of {taken}; rename the entry point (and its objective) or uninstall one of them."
            )
        try:
            plugin = entry_point.load()
        except Exception as error:
            raise ObjectivePluginError(
                f"objective plugin {_describe(entry_point)} in entry-point group {ENTRY_POINT_GROUP} failed to "
                f"import: {error!r}. Fix or uninstall {_dist(entry_point)}."
            ) from error
        manager.register(plugin, name=name)
        loaded[name] = entry_point


class ObjectiveRegistry:
    """Objectives by name, gathered from every registered plugin."""

    def __init__(self, manager: pluggy.PluginManager):
        self.manager = manager
        self._objectives: dict[str, Objective] = {}
        for provided in manager.hook.psft_plugin_objectives():
            for objective in provided:
                if objective.name in self._objectives:
                    raise ObjectivePluginError(
                        f"objective name `{objective.name}` is registered twice; rename one of the plugins' objectives"
                    )
                self._objectives[objective.name] = objective

    def names(self) -> list[str]:
        """Registered objective names, sorted."""
        return sorted(self._objectives)

    def get(self, name: str) -> Objective:
        """The objective called ``name``; raises :class:`UnknownObjectiveError` listing the known ones."""
        try:
            return self._objectives[name]
        except KeyError:
            raise UnknownObjectiveError(
                f"unknown objective `loss: {name}`{suggest(str(name), self._objectives)}; registered "
                f"objectives: {', '.join(self.names())}. Third-party objectives are installed through "
                f"the `{ENTRY_POINT_GROUP}` entry-point group."
            ) from None

    def options(self) -> dict[str, Option]:
        """Every YAML option: each objective's, then the trainer's own (:data:`TRAINER_OPTIONS`), by key.

        The first declaration of a key wins.
        """
        options: dict[str, Option] = {}
        for name in self.names():
            for option in self._objectives[name].options:
                options.setdefault(option.key, option)
        for option in TRAINER_OPTIONS:
            options.setdefault(option.key, option)
        return options

    def keys_read_by(self, objective: Objective) -> set[str]:
        """The YAML keys that take effect with ``loss: <objective>``: its own options and the trainer's."""
        return {option.key for option in (*objective.options, *TRAINER_OPTIONS)}


@functools.lru_cache(maxsize=1)
def default_registry() -> ObjectiveRegistry:
    """The process-wide registry (built-ins plus installed entry points), built once."""
    return ObjectiveRegistry(make_plugin_manager())


def get_objective(name: str, registry: Optional[ObjectiveRegistry] = None) -> Objective:
    """Look an objective up by name in ``registry`` (default: the process-wide one)."""
    return (registry or default_registry()).get(name)


def objectives_table(registry: Optional[ObjectiveRegistry] = None) -> str:
    """The README's table of objectives (name, old policy, keys, description), from their declarations."""
    registry = registry or default_registry()
    rows = ["| `loss:` | old policy | keys | what it optimises |", "|---|---|---|---|"]
    for name in registry.names():
        objective = registry.get(name)
        keys = ", ".join(f"`{option.key}`" for option in objective.options) or "-"
        rows.append(f"| `{name}` | {'yes' if objective.uses_old_policy else 'no'} | {keys} | {objective.description} |")
    return "\n".join(rows)
