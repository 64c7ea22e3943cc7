"""Configuration knobs, each declared once (PSFT_SPEC.md section 5).

Objectives list their :class:`Option` s; the Axolotl args model, the MLX YAML/CLI and the
README table are all derived from these declarations, so a default or a bound lives in one
place. Validation reports every problem at once, naming the key and the fix.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Option:
    """One YAML key of an objective.

    Attributes:
        key: the YAML key, e.g. ``psft_epsilon_high``.
        default: value used when the key is absent.
        help: one sentence for the docs and the CLI.
        loss_arg: keyword of the backend loss function fed by this key (``None`` for keys the
            trainer consumes, such as the refresh period).
        type: ``float``, ``int`` or ``str``.
        ge, gt, lt: numeric bounds (inclusive, exclusive, exclusive).
        choices: allowed values for a string option.
    """

    key: str
    default: Any
    help: str
    loss_arg: Optional[str] = None
    type: type = float
    ge: Optional[float] = None
    gt: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple[str, ...]] = None

    def problem(self, value: Any) -> Optional[str]:
        """A sentence naming the key, the bad value and the fix, or ``None`` if ``value`` is valid."""
        if self.choices is not None:
            if value not in self.choices:
                return f"`{self.key}: {value!r}` is not allowed; use one of {', '.join(self.choices)}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"`{self.key}: {value!r}` must be a {self.type.__name__}"
        if self.type is int and int(value) != value:
            return f"`{self.key}: {value!r}` must be a whole number"
        bounds = [
            (self.ge, lambda v, b: v >= b, ">="),
            (self.gt, lambda v, b: v > b, ">"),
            (self.lt, lambda v, b: v < b, "<"),
        ]
        for bound, ok, sign in bounds:
            if bound is not None and not ok(value, bound):
                return f"`{self.key}: {value}` is out of range; it must be {sign} {bound}"
        return None

    def bounds_text(self) -> str:
        """Human-readable range, for docs: e.g. ``[0, 1)``."""
        if self.choices:
            return ", ".join(f"`{choice}`" for choice in self.choices)
        low = f"[{self.ge}" if self.ge is not None else (f"({self.gt}" if self.gt is not None else "(-inf")
        high = f"{self.lt})" if self.lt is not None else "inf)"
        return f"{low}, {high}"


class ConfigError(ValueError):
    """A configuration that cannot train as written; the message lists every problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def suggest(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean `x`?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def resolve_options(options: Sequence[Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults for ``options`` from ``values`` and validate them.

    Returns ``{key: value}`` for every option. Raises :class:`ConfigError` listing every bad
    value. Keys in ``values`` that are not options are ignored here (see :func:`unknown_keys`).
    """
    resolved, problems = {}, []
    for option in options:
        value = values.get(option.key)
        value = option.default if value is None else value
        problem = option.problem(value)
        if problem:
            problems.append(problem)
        else:
            resolved[option.key] = option.type(value)
    if problems:
        raise ConfigError(problems)
    return resolved


def unknown_keys(keys: Iterable[str], known: Iterable[str], prefix: str = "") -> list[str]:
    """Problems for each key starting with ``prefix`` that is not in ``known``, with a suggestion."""
    known = list(known)
    return [
        f"unknown key `{key}`{suggest(key, known)}"
        for key in keys
        if key.startswith(prefix) and key not in known
    ]


def loss_kwargs(options: Sequence[Option], resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments the backend loss takes from ``resolved`` option values."""
    return {o.loss_arg: resolved[o.key] for o in options if o.loss_arg is not None}


def markdown_table(options: Sequence[Option]) -> str:
    """The README's configuration table, generated from the declarations."""
    rows = ["| key | default | range | meaning |", "|---|---|---|---|"]
    rows += [f"| `{o.key}` | `{o.default}` | {o.bounds_text()} | {o.help} |" for o in options]
    return "\n".join(rows)
