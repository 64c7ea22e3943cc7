"""The training metrics both backends log: their names, how they combine and their ``psft/`` prefix.

An objective's loss returns ``(loss, metrics)``: ``metrics`` holds ``tokens`` (the call's
response-token count) and any values the objective wants logged, each a mean over its
response tokens unless :data:`REDUCTIONS` says otherwise. The trainers add ``entropy`` (mean
predictive entropy, nats) and ``objective`` (the step's loss). Any name an objective returns,
a third-party one's included, reaches the host's log as ``psft/<name>``.

Two levels of combination:

- within an optimizer step, over its micro-batches and data-parallel ranks
  (:func:`reduction`, :func:`combine`): a mean weighted by response tokens, except the names
  in :data:`REDUCTIONS`. The MLX report window combines its micro-batches the same way.
- over the steps of one log line (:func:`step_reduction`, :func:`combine_steps`): extremes
  stay extremes, everything else is the plain mean of the step values, as the host does for
  its own ``loss``.

Plain Python: the torch trainer applies the same rule to device tensors and collectives.
"""

from __future__ import annotations

from typing import Mapping, Sequence

PREFIX = "psft/"
"""Prefix of every metric in the hosts' logs (transformers/Axolotl log lines, MLX reports)."""

TOKENS = "tokens"
"""Response tokens of a micro-batch (or step): the weight of every mean, not logged itself."""
OBJECTIVE = "objective"
"""The step's objective: the sum of its micro-batch losses (each already divided by the step's denominator)."""
ENTROPY = "entropy"
"""Mean predictive entropy (nats) over the response tokens, measured by the trainer for every objective."""

MEAN, SUM, MIN, MAX = "mean", "sum", "min", "max"

REDUCTIONS: Mapping[str, str] = {"ratio_min": MIN, "ratio_max": MAX, OBJECTIVE: SUM, TOKENS: SUM}
"""How these metrics combine over a step's micro-batches and ranks; every other name is a :data:`MEAN`."""


def reduction(name: str) -> str:
    """How metric ``name`` combines within a step: ``mean`` (response-token weighted), ``sum``, ``min`` or ``max``."""
    return REDUCTIONS.get(name, MEAN)


def step_reduction(name: str) -> str:
    """How metric ``name`` combines over the steps of one log line: ``min``, ``max`` or ``mean``.

    These are the reductions Axolotl's ``store_metrics`` knows by these names.
    """
    kind = reduction(name)
    return kind if kind in (MIN, MAX) else MEAN


def combine(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine micro-batch metric dicts (Python numbers, each with ``tokens``) into one.

    Sums (``tokens``, ``objective``) run over every part. A mean or an extreme runs over the
    parts that have the metric and at least one response token: a report may span SFT warm-up
    steps (no ratio metrics) and PSFT steps, and a part without tokens has no value to give.
    A mean or extreme no part can give is left out.
    """
    out: dict[str, float] = {TOKENS: float(sum(part.get(TOKENS, 0) for part in parts))}
    weighted = [part for part in parts if part.get(TOKENS, 0) > 0]
    names = sorted({name for part in parts for name in part} - {TOKENS})
    for name in names:
        kind = reduction(name)
        if kind == SUM:
            out[name] = float(sum(part[name] for part in parts if name in part))
            continue
        having = [part for part in weighted if name in part]
        if not having:
            continue
        if kind == MEAN:
            out[name] = sum(part[name] * part[TOKENS] for part in having) / sum(part[TOKENS] for part in having)
        else:
            out[name] = (min if kind == MIN else max)(part[name] for part in having)
    return out


def combine_steps(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine per-step metric dicts (any keys, prefixed or not) for one log line, by :func:`step_reduction`."""
    combined = {}
    for key in sorted({key for record in records for key in record}):
        values = [record[key] for record in records if key in record]
        kind = step_reduction(key.removeprefix(PREFIX))
        combined[key] = min(values) if kind == MIN else max(values) if kind == MAX else sum(values) / len(values)
    return combined


def prefixed(metrics: Mapping[str, float]) -> dict[str, float]:
    """``{"psft/<name>": value}`` for a log, ``tokens`` (the weight, logged by the hosts their own way) left out."""
    return {PREFIX + name: value for name, value in metrics.items() if name != TOKENS}


def unprefixed(log: Mapping[str, float]) -> dict[str, float]:
    """The ``psft/*`` metrics of a log dict, prefix removed, in the log's order (e.g. for a console line)."""
    return {key.removeprefix(PREFIX): value for key, value in log.items() if key.startswith(PREFIX)}
