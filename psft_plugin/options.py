"""Configuration knobs, each declared once (docs/objective.md section 5).

Objectives list their :class:`Option` s; the Axolotl args model, the MLX YAML/CLI and the
README table are all derived from these declarations, so a default or a bound lives in one
place. Validation reports every problem at once, naming the key and the fix.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
"""How a problem names the expected type; ``object`` accepts any value."""


@dataclass(frozen=True)
class Option:
    """One configuration key: of an objective, of a trainer or of a host (the MLX command line).

    Attributes:
        key: the YAML key, e.g. ``psft_epsilon_high``.
        default: value used when the key is absent (or ``None``); a ``None`` default means
            "unset" and is always valid.
        help: one sentence for the docs and the CLI.
        loss_arg: keyword of the backend loss function fed by this key (``None`` for keys the
            trainer or the host consumes, such as the refresh period).
        type: ``float``, ``int``, ``str``, ``bool``, ``dict`` or ``object`` (any value).
            ``float`` accepts ints; ``int`` accepts whole floats (``4.0``); neither accepts a bool.
        ge, gt, lt: numeric bounds (inclusive, exclusive, exclusive).
        choices: allowed values (of a string option).
        flag: the MLX command line has a ``--key`` flag for it (``False``: YAML only, e.g. nested mappings).
        parse: turns a raw value into the value checked and used (``AdamW`` -> ``adamw``, ``1GB`` ->
            bytes); raises ``ValueError`` with the reason (completed by "`key: value` <reason>").
            A command-line flag of an option with ``parse`` takes a string.
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
    flag: bool = True
    parse: Optional[Callable[[Any], Any]] = None

    def problem(self, value: Any) -> Optional[str]:
        """A sentence naming the key, the bad value and the fix, or ``None`` if ``value`` is valid."""
        if value is None and self.default is None:
            return None
        if self.choices is not None:
            if value not in self.choices:
                return f"`{self.key}: {value!r}` is not allowed; use one of {', '.join(self.choices)}"
            return None
        if self.type is object:
            return None
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"`{self.key}: {value!r}` must be {TYPE_NAMES[self.type]}"
        elif not isinstance(value, self.type):
            return f"`{self.key}: {value!r}` must be {TYPE_NAMES.get(self.type, f'a {self.type.__name__}')}"
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

    def read(self, value: Any) -> tuple[Any, Optional[str]]:
        """``(value to use, problem or None)`` for a raw ``value`` (``None``: the default).

        The value is parsed (:attr:`parse`), checked (:meth:`problem`) and, when valid, converted
        to :attr:`type` for numbers (``4.0`` -> ``4`` for an int option); an invalid value is
        returned as given, with its problem.
        """
        value = self.default if value is None else value
        if value is not None and self.parse is not None:
            try:
                value = self.parse(value)
            except ValueError as error:
                return value, f"`{self.key}: {value!r}` {error}"
        problem = self.problem(value)
        if problem is None and value is not None and self.type in (int, float):
            value = self.type(value)
        return value, problem

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
    """`` (did you mean `x`?)`` for the closest candidate, case ignored (``PSFT`` -> ``psft``), or an empty string."""
    by_lower = {str(candidate).lower(): candidate for candidate in candidates}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean `{by_lower[close[0]]}`?)" if close else ""


def resolve_options(options: Sequence[Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults for ``options`` from ``values`` and validate them (:meth:`Option.read`).

    Returns ``{key: value}`` for every option. Raises :class:`ConfigError` listing every bad
    value. Keys in ``values`` that are not options are ignored here: the whole configuration's
    rules live in :func:`psft_plugin.config.resolve`.
    """
    resolved, problems = {}, []
    for option in options:
        value, problem = option.read(values.get(option.key))
        if problem:
            problems.append(problem)
        else:
            resolved[option.key] = value
    if problems:
        raise ConfigError(problems)
    return resolved


def unknown_keys(keys: Iterable[str], known: Iterable[str], prefix: str = "") -> list[str]:
    """Problems for each key starting with ``prefix`` that is not in ``known``, with a suggestion."""
    known = list(known)
    return [f"unknown key `{key}`{suggest(key, known)}" for key in keys if key.startswith(prefix) and key not in known]


def loss_kwargs(options: Sequence[Option], resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments the backend loss takes from ``resolved`` option values."""
    return {o.loss_arg: resolved[o.key] for o in options if o.loss_arg is not None}


def markdown_table(options: Sequence[Option]) -> str:
    """The README's configuration table, generated from the declarations."""
    rows = ["| key | default | range | meaning |", "|---|---|---|---|"]
    rows += [f"| `{o.key}` | `{o.default}` | {o.bounds_text()} | {o.help} |" for o in options]
    return "\n".join(rows)
