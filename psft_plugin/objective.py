"""What an objective is: a name, its options and its per-backend loss functions."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from psft_plugin.options import Option, loss_kwargs, resolve_options


@dataclass(frozen=True)
class Objective:
    """A training objective the hosts can look up by name.

    Attributes:
        name: the value users write as ``loss: <name>``.
        description: one line for listings and docs.
        implementations: backend name -> ``"module:function"`` of the loss. Every function has
            the contract ``fn(logp, old_logp, mask, *, num_tokens=None, **loss_args) ->
            (loss, metrics)`` with ``[B, T]`` inputs; imported only when asked for, so the core
            never imports a framework.
        options: the YAML keys this objective reads.
        uses_old_policy: the trainer must keep old log-probs refreshed every
            ``psft_refresh_steps`` optimizer steps and pass them as ``old_logp``.
    """

    name: str
    description: str
    implementations: Mapping[str, str]
    options: tuple[Option, ...] = field(default_factory=tuple)
    uses_old_policy: bool = False

    def loss_fn(self, backend: str) -> Callable[..., tuple[Any, dict]]:
        """Import and return this objective's loss function for ``backend``."""
        target = self.implementations.get(backend)
        if target is None:
            raise NotImplementedError(
                f"objective `{self.name}` has no `{backend}` implementation; it supports "
                f"{', '.join(sorted(self.implementations)) or 'no backend'}"
            )
        module_name, _, attr = target.partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def resolve(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Validated option values (defaults filled) from a config mapping."""
        return resolve_options(self.options, values)

    def loss_kwargs(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for :meth:`loss_fn` taken from resolved option values."""
        return loss_kwargs(self.options, resolved)
