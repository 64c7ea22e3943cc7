"""One resolver for every host: a raw configuration mapping to the settings a trainer runs with.

The Axolotl args model, the torch trainer mixin and the MLX command line all call
:func:`resolve`, so every configuration rule they share is written once, in that function:

1. ``loss`` names a registered objective (a close match is suggested);
2. every ``psft_*`` key is a registered option, and so is every other key that is closer to a
   registered option than to any key the host knows (third-party options such as
   ``my_loss_temperature`` have no prefix); a host whose configuration holds only its own keys
   and ours (``closed``) has every other key reported;
3. every value set is valid for its option (type, bounds, choices);
4. an option the chosen objective does not read is an error naming the key and the fix, in
   every host (``loss: ce`` with ``psft_refresh_steps`` would silently train plain SFT);
5. the host's own problems (settings it cannot run with, paths, its own keys), computed by the
   host and handed in, are reported with the rest.

The hosts differ only in the problems they hand in. Framework-free: NumPy, pluggy, stdlib.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Optional, Sequence

from psft_plugin.objective import Objective
from psft_plugin.objectives import AGGREGATION_OPTION, LM_HEAD_CHUNK_KEY, REFRESH_KEY, TRAINER_OPTIONS, WARMUP_KEY
from psft_plugin.options import ConfigError, Option, resolve_options, suggest
from psft_plugin.registry import ObjectiveRegistry, UnknownObjectiveError, default_registry

LOSS_OPTION = Option("loss", "ce", "objective name from the registry: `psft` for PSFT, `ce` for plain SFT", type=str)
"""``loss``: the objective. One default for every host, so a config without it trains plain SFT."""

KEY_PREFIX = "psft_"
CLOSE_MATCH = 0.6
"""``difflib`` similarity from which an unknown key is taken for a misspelt option."""


@dataclass(frozen=True)
class Settings:
    """A validated configuration: the objective, its option values and the trainer's.

    Attributes:
        objective: the registered objective ``loss`` names.
        resolved: the objective's own options, ``{key: value}`` with defaults filled (what
            :meth:`Objective.loss_kwargs` reads).
        trainer: the trainer options read with every objective (:data:`TRAINER_OPTIONS`).
        refresh_steps: optimizer steps per old-policy window (K); 1 for objectives without an
            old policy.
        warmup_steps: plain-SFT optimizer steps before the objective starts (0 without an old policy).
    """

    objective: Objective
    resolved: Mapping[str, Any]
    trainer: Mapping[str, Any]
    refresh_steps: int
    warmup_steps: int

    @property
    def lm_head_chunk_size(self) -> int:
        """Response tokens per LM-head chunk (0: full logits); see :data:`TRAINER_OPTIONS`."""
        return int(self.trainer[LM_HEAD_CHUNK_KEY])

    @property
    def loss_agg(self) -> str:
        """How per-token losses are averaged over an optimizer step (every objective reads it)."""
        return str(self.resolved.get(AGGREGATION_OPTION.key, AGGREGATION_OPTION.default))

    def summary(self) -> str:
        """What a host's start-up line says: the objective, its values, and the window only if it keeps an old policy.

        E.g. ``loss=psft (psft_epsilon_high=0.28, ...), refresh every 8 optimizer steps`` or ``loss=ce``.
        """
        values = ", ".join(
            f"{key}={value}" for key, value in self.resolved.items() if key not in (REFRESH_KEY, WARMUP_KEY)
        )
        text = f"loss={self.objective.name}" + (f" ({values})" if values else "")
        if self.objective.uses_old_policy:
            text += f", refresh every {self.refresh_steps} optimizer steps"
            text += f" after {self.warmup_steps} warm-up steps" if self.warmup_steps else ""
        return text


def _users(registry: ObjectiveRegistry, key: str) -> str:
    """``psft`` or ``a or b``: the objectives that read option ``key``."""
    return " or ".join(name for name in registry.names() if key in {o.key for o in registry.get(name).options})


def _objective_problems(
    config: Mapping[str, Any], registry: ObjectiveRegistry
) -> tuple[Optional[Objective], list[str]]:
    """Rule 1: the registered objective ``loss`` names, or ``None`` and the problem."""
    name, problem = LOSS_OPTION.read(config.get(LOSS_OPTION.key))
    if problem:
        return None, [problem]
    try:
        return registry.get(name), []
    except UnknownObjectiveError as error:
        return None, [str(error)]


def _unknown_key_problems(
    config: Mapping[str, Any], options: Mapping[str, Option], host_keys: Collection[str], closed: bool
) -> list[str]:
    """Rule 2: unknown ``psft_*`` keys, keys closer to an option than to any known key, and (``closed``) any other."""
    known = {LOSS_OPTION.key, *options, *host_keys}
    problems = []
    for key in (key for key in config if key not in known):
        if str(key).startswith(KEY_PREFIX):
            problems.append(f"unknown key `{key}`{suggest(str(key), options)}")
        elif closed:
            problems.append(f"unknown key `{key}`{suggest(str(key), known)}")
        else:  # a key of the host's that we were not told about is closer to that key than to ours
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=CLOSE_MATCH)
            if close and close[0] in options:
                problems.append(f"unknown key `{key}` (did you mean `{close[0]}`?)")
    return problems


def _value_problems(config: Mapping[str, Any], options: Mapping[str, Option]) -> list[str]:
    """Rule 3: the type, bounds or choices of every option set."""
    return [
        problem
        for key, option in options.items()
        if config.get(key) is not None
        for problem in [option.problem(config[key])]
        if problem
    ]


def _ignored_option_problems(config: Mapping[str, Any], objective: Objective, registry: ObjectiveRegistry) -> list[str]:
    """Rule 4: options set that ``objective`` does not read (never train plain CE with PSFT keys in the file)."""
    name = objective.name
    unset = "" if config.get(LOSS_OPTION.key) is not None else f" (`loss` is not set; its default is `{name}`)"
    read = registry.keys_read_by(objective)
    return [
        f"`{key}` has no effect with `loss: {name}`; set `loss: {_users(registry, key)}` or remove `{key}`{unset}"
        for key in registry.options()
        if key not in read and config.get(key) is not None
    ]


def _settings(objective: Objective, config: Mapping[str, Any]) -> Settings:
    """The settings of a configuration with no problem: option values with defaults filled."""
    values = {key: value for key, value in config.items() if value is not None}
    resolved = objective.resolve(values)
    old_policy = objective.uses_old_policy
    return Settings(
        objective=objective,
        resolved=resolved,
        trainer=resolve_options(TRAINER_OPTIONS, values),
        refresh_steps=int(resolved.get(REFRESH_KEY, 1)) if old_policy else 1,
        warmup_steps=int(resolved.get(WARMUP_KEY, 0)) if old_policy else 0,
    )


def resolve(
    config: Mapping[str, Any],
    *,
    host_keys: Collection[str] = (),
    closed: bool = False,
    host_problems: Sequence[str] = (),
    registry: Optional[ObjectiveRegistry] = None,
) -> Settings:
    """The :class:`Settings` of the raw mapping ``config``, or :class:`ConfigError` listing every problem.

    Args:
        config: the raw configuration (a YAML mapping, or ``{"loss": ..., "psft_*": ...}``);
            ``None`` values count as unset.
        host_keys: keys the host itself reads; they are never taken for misspelt options.
        closed: ``config`` holds only the host's keys and ours, so any other key is unknown
            (the MLX command line, the trainer mixin's ``psft_config``).
        host_problems: problems the host found in its own settings, reported with the rest.
        registry: the objective registry (default: the process-wide one).

    Returns the settings when there is no problem at all; the rules are listed in the module
    docstring, one function each.
    """
    registry = registry or default_registry()
    options = registry.options()
    objective, problems = _objective_problems(config, registry)
    problems += _unknown_key_problems(config, options, host_keys, closed)
    problems += _value_problems(config, options)
    if objective is not None:
        problems += _ignored_option_problems(config, objective, registry)
    problems += host_problems  # rule 5: what the host found in its own settings
    if problems:
        raise ConfigError(problems)
    return _settings(objective, config)
