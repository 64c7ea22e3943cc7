"""Proximal Supervised Fine-Tuning (PSFT) for the fine-tuning tools people already use.

The core (the modules imported here, with :mod:`psft_plugin.spec`, :mod:`psft_plugin.config`,
:mod:`psft_plugin.window` and :mod:`psft_plugin.metrics`) needs only NumPy and pluggy: the NumPy
reference of the objectives, the objective registry and the configuration rules. The framework
code lives in the ``psft_torch`` and ``psft_mlx`` backends; the hosts (Axolotl in
:mod:`psft_plugin.integrations`, the MLX command line in :mod:`psft_plugin.mlx_train`) and the
demo and benchmark tools sit on top of them. The layering is enforced by ``.importlinter``.
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
