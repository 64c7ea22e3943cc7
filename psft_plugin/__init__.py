"""Proximal Supervised Fine-Tuning (PSFT) for the fine-tuning tools people already use.

The core (this package) needs only NumPy and pluggy: the NumPy reference of the objective
(:mod:`psft_plugin.spec`), the objective registry and the host integrations. The framework
code lives in the ``psft_torch`` and ``psft_mlx`` backends.
"""

from psft_plugin.hookspecs import hookimpl
from psft_plugin.objective import Objective
from psft_plugin.options import ConfigError, Option
from psft_plugin.registry import ObjectiveRegistry, UnknownObjectiveError, default_registry, get_objective

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Objective",
    "ObjectiveRegistry",
    "Option",
    "UnknownObjectiveError",
    "default_registry",
    "get_objective",
    "hookimpl",
]
