"""The MLX training loop: refresh, step and report phases (PSFT_SPEC.md sections 2 and 3).

:func:`train` takes a model, an optimizer, an iterator of :class:`~psft_mlx.data.MicroBatch`,
an objective from the registry and its resolved options; it returns one record per optimizer
step. It knows nothing about files or YAML: evaluation, saving and reporting are passed in,
like mlx-lm's ``train``, so the parity suite can drive it with its own model and data order.

Old policy: every ``psft_refresh_steps`` = K optimizer steps the loop takes the next K × GA
micro-batches, stamps each with its log-probs under the current weights (eval mode, no
gradient, no model copy), then runs K optimizer steps on them in order. The first GA
micro-batches of a window are not stamped: r = 1 there, so the training forward's own
``stop_gradient(logp)`` is their old log-prob.

Aggregation: each micro-batch loss is computed with ``num_tokens=1`` (a plain sum over its
tokens or rows) and multiplied by ``1 / D``, D = the whole optimizer step's denominator; the
gradients are summed and applied once. That equals ``num_tokens=D`` but keeps D an array
input, so ``mx.compile`` does not retrace every step.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from psft_mlx.data import MicroBatch
from psft_mlx.loss import token_entropy, token_logprobs
from psft_plugin.objective import Objective

MEAN_METRICS = ("clipfrac", "ratio_mean", "approx_kl", "entropy", "nll")
LogprobsFn = Callable[[nn.Module, mx.array, mx.array], tuple[mx.array, Optional[mx.array]]]


@dataclass
class LoopArgs:
    """Schedule of the loop, in optimizer steps (mlx-lm counts micro-batches; see docs/mlx.md)."""

    iters: int
    grad_accumulation_steps: int = 1
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    clear_cache_threshold: int = 0
    compile: bool = True


class Callback(Protocol):
    """mlx-lm's ``TrainingCallback`` interface: dicts of Python numbers."""

    def on_train_loss_report(self, train_info: dict) -> None: ...

    def on_val_loss_report(self, val_info: dict) -> None: ...


def model_logprobs(model: nn.Module, inputs: mx.array, targets: mx.array) -> tuple[mx.array, Optional[mx.array]]:
    """Forward ``[B, T]`` inputs; return float32 ``[B, T]`` target log-probs and token entropies.

    A replacement (e.g. a chunked kernel that never holds ``[B, T, V]`` logits) may return
    ``None`` for the entropies: the metric is then left out. MLX is lazy, so callers that use
    only the log-probs (refresh, evaluation) never compute the entropies.
    """
    logits = model(inputs)
    return token_logprobs(logits, targets), token_entropy(logits)


def make_step_fn(model: nn.Module, loss_fn: Callable, loss_kwargs: Mapping[str, Any],
                 logprobs_fn: LogprobsFn = model_logprobs, compile: bool = True) -> Callable:
    """``fn(inputs, targets, mask, old_logp|None, scale) -> ((loss, metrics), grads)`` for one micro-batch.

    ``old_logp=None`` takes the old policy from this forward (r = 1). ``scale`` (0-dim array)
    is ``1 / step denominator``. Every varying value is an argument, never a captured array:
    ``mx.compile`` would freeze a capture at its first value.
    """

    def objective(inputs, targets, mask, old_logp, scale):
        logp, entropy = logprobs_fn(model, inputs, targets)
        old = mx.stop_gradient(logp) if old_logp is None else old_logp
        loss, metrics = loss_fn(logp, old, mask, num_tokens=1.0, **loss_kwargs)
        if entropy is not None:
            metrics = {**metrics, "entropy": (entropy * mask).sum() / mx.maximum(mask.sum(), 1.0)}
        return loss * scale, metrics

    value_and_grad = nn.value_and_grad(model, objective)
    if not compile:
        return value_and_grad
    state = [model.state, mx.random.state]
    return mx.compile(value_and_grad, inputs=state, outputs=state)


def step_denominator(group: Sequence[MicroBatch], agg: str) -> int:
    """Tokens (``token-mean``) or non-empty sequences (``seq-*``) of one optimizer step."""
    return sum(mb.tokens if agg == "token-mean" else mb.rows for mb in group)


def combine_metrics(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Token-weighted means (min/max for the ratio extremes) of micro-batch or step metrics.

    A metric is combined over the parts that have it (a report may span SFT warm-up steps,
    which have no ratio metrics, and PSFT steps); parts without tokens are left out.
    """
    weighted = [p for p in parts if p.get("tokens", 0) > 0]
    out: dict[str, float] = {"tokens": float(sum(p.get("tokens", 0) for p in parts))}
    for name in MEAN_METRICS:
        having = [p for p in weighted if name in p]
        if having:
            out[name] = sum(p[name] * p["tokens"] for p in having) / sum(p["tokens"] for p in having)
    for name, pick in (("ratio_min", min), ("ratio_max", max)):
        if any(name in p for p in weighted):
            out[name] = pick(p[name] for p in weighted if name in p)
    return out


def optimizer_step(model: nn.Module, optimizer, step_fn: Callable, group: Sequence[MicroBatch],
                   agg: str) -> dict[str, float]:
    """Accumulate gradients over ``group`` (one step's micro-batches), update once; return metrics."""
    denominator = step_denominator(group, agg)
    scale = mx.array(1.0 / denominator if denominator > 0 else 0.0)
    grads, loss, parts = None, 0.0, []
    for mb in group:
        (mb_loss, metrics), mb_grads = step_fn(mb.inputs, mb.targets, mb.mask, mb.old_logp, scale)
        grads = mb_grads if grads is None else tree_map(mx.add, grads, mb_grads)
        mx.eval(mb_loss, metrics, grads)
        loss += mb_loss.item()
        parts.append({name: value.item() for name, value in metrics.items()})
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    return {"loss": loss, **combine_metrics(parts)}


def stamp_old_logp(model: nn.Module, micro_batches: Iterable[MicroBatch],
                   logprobs_fn: LogprobsFn = model_logprobs) -> None:
    """Refresh phase: set ``old_logp`` of each micro-batch from the current weights.

    Eval mode (dropout off) and no gradient; the weights are not copied.
    """
    was_training = model.training
    model.eval()
    for mb in micro_batches:
        mb.old_logp = mx.stop_gradient(logprobs_fn(model, mb.inputs, mb.targets)[0])
        mx.eval(mb.old_logp)
    model.train(was_training)


def take(batches: Iterator[MicroBatch], count: int) -> list[MicroBatch]:
    """The next ``count`` micro-batches (fewer when ``batches`` runs out)."""
    return list(itertools.islice(batches, count))


class OldPolicyWindow:
    """Hands out one step's micro-batches at a time, refreshing the old policy every K steps."""

    def __init__(self, model: nn.Module, batches: Iterator[MicroBatch], refresh_steps: int,
                 grad_accumulation_steps: int, logprobs_fn: LogprobsFn = model_logprobs):
        self.model, self.batches, self.k = model, batches, refresh_steps
        self.ga, self.logprobs_fn = grad_accumulation_steps, logprobs_fn
        self.queue: deque[list[MicroBatch]] = deque()

    def next_group(self, steps_left: int) -> tuple[list[MicroBatch], bool]:
        """The next step's micro-batches and whether a refresh happened for it.

        A refresh takes ``min(K, steps_left)`` steps' worth, so nothing is stamped in vain.
        """
        if self.queue:
            return self.queue.popleft(), False
        groups = [take(self.batches, self.ga) for _ in range(min(self.k, steps_left))]
        groups = [g for g in groups if g]
        stamp_old_logp(self.model, [mb for g in groups[1:] for mb in g], self.logprobs_fn)
        self.queue.extend(groups[1:])
        return (groups[0] if groups else []), True


class Reporter:
    """Report phase: aggregates step records between reports and times the training work."""

    def __init__(self, optimizer, callback: Optional[Callback]):
        self.optimizer, self.callback = optimizer, callback
        self.pending: list[dict[str, float]] = []
        self.train_time = 0.0
        self.trained_tokens = 0.0

    def add(self, record: dict[str, float], seconds: float) -> None:
        self.pending.append(record)
        self.train_time += seconds

    def report(self, step: int) -> Optional[dict[str, float]]:
        """Aggregate the pending steps into one report and pass it to the callback."""
        if not self.pending:
            return None
        metrics = combine_metrics(self.pending)
        self.trained_tokens += metrics["tokens"]
        info = {
            "iteration": step,
            "train_loss": sum(r["loss"] for r in self.pending) / len(self.pending),
            **{f"psft/{k}": v for k, v in metrics.items() if k != "tokens"},
            "learning_rate": self.optimizer.learning_rate.item(),
            "tokens_per_second": metrics["tokens"] / max(self.train_time, 1e-9),
            "iterations_per_second": len(self.pending) / max(self.train_time, 1e-9),
            "trained_tokens": self.trained_tokens,
            "peak_memory": mx.get_peak_memory() / 1e9,
        }
        self.pending, self.train_time = [], 0.0
        if self.callback is not None:
            self.callback.on_train_loss_report(info)
        return info


def resolve_loss(objective: Objective, options: Mapping[str, Any]) -> tuple[Callable, dict[str, Any]]:
    """The objective's MLX loss and its keyword arguments from resolved ``options``."""
    return objective.loss_fn("mlx"), objective.loss_kwargs(options)


def _run_eval(evaluate: Optional[Callable[[nn.Module], float]], model: nn.Module, step: int,
              callback: Optional[Callback]) -> None:
    if evaluate is None:
        return
    tic = time.perf_counter()
    val_loss = evaluate(model)
    model.train()
    if callback is not None:
        callback.on_val_loss_report({"iteration": step, "val_loss": val_loss,
                                     "val_time": time.perf_counter() - tic})


def train(
    model: nn.Module,
    optimizer,
    batches: Iterable[MicroBatch],
    objective: Objective,
    options: Mapping[str, Any],
    args: LoopArgs,
    *,
    callback: Optional[Callback] = None,
    evaluate: Optional[Callable[[nn.Module], float]] = None,
    save: Optional[Callable[[int], None]] = None,
    logprobs_fn: LogprobsFn = model_logprobs,
    warmup_objective: Optional[Objective] = None,
) -> list[dict[str, float]]:
    """Train for ``args.iters`` optimizer steps (fewer if ``batches`` runs out).

    ``options`` are the objective's resolved ``psft_*`` values (``objective.resolve(...)``).
    ``warmup_objective`` (plain SFT, ``ce``) trains the first ``psft_warmup_steps`` steps.
    Returns one record per optimizer step: ``step``, ``loss``, ``tokens``, ``refresh`` (1 if the
    old policy was refreshed for it), ``learning_rate`` and the objective's metrics.
    """
    batches = iter(batches)
    ga = args.grad_accumulation_steps
    agg = options.get("psft_loss_agg", "token-mean")
    main_fn = make_step_fn(model, *resolve_loss(objective, options), logprobs_fn, args.compile)
    warmup = options.get("psft_warmup_steps", 0) if objective.uses_old_policy else 0
    warm_fn = None
    if warmup:
        if warmup_objective is None:
            raise ValueError("psft_warmup_steps > 0 needs warmup_objective (the `ce` objective)")
        warm_fn = make_step_fn(model, *resolve_loss(warmup_objective, options), logprobs_fn, args.compile)
    window = OldPolicyWindow(model, batches, options.get("psft_refresh_steps", 1), ga, logprobs_fn)
    reporter, records = Reporter(optimizer, callback), []
    model.train()
    _run_eval(evaluate, model, 0, callback)
    for step in range(1, args.iters + 1):
        tic = time.perf_counter()
        if step <= warmup:
            group, refreshed, step_fn = take(batches, ga), False, warm_fn
        elif objective.uses_old_policy:
            (group, refreshed), step_fn = window.next_group(args.iters - step + 1), main_fn
        else:
            group, refreshed, step_fn = take(batches, ga), False, main_fn
        if not group:
            break
        records.append({"step": step, "refresh": float(refreshed), "learning_rate": optimizer.learning_rate.item(),
                        **optimizer_step(model, optimizer, step_fn, group, agg)})
        _clear_cache(args.clear_cache_threshold)
        reporter.add(records[-1], time.perf_counter() - tic)
        _after_step(step, args, reporter, evaluate, save, model, callback, warmup)
    last = int(records[-1]["step"]) if records else 0
    if last % args.steps_per_report:
        reporter.report(last)
    if last % args.steps_per_eval:
        _run_eval(evaluate, model, last, callback)
    return records


def _after_step(step: int, args: LoopArgs, reporter: Reporter, evaluate, save, model, callback,
                warmup: int) -> None:
    """Report, evaluate and save on their schedules; a report never mixes SFT warm-up and PSFT steps."""
    if step % args.steps_per_report == 0 or step == warmup:
        reporter.report(step)
    if step % args.steps_per_eval == 0:
        _run_eval(evaluate, model, step, callback)
    if save is not None and step % args.save_every == 0:
        save(step)


def _clear_cache(threshold: int) -> None:
    if threshold and mx.get_cache_memory() > threshold:
        mx.clear_cache()


def evaluate_nll(model: nn.Module, batches: Iterable[MicroBatch],
                 logprobs_fn: LogprobsFn = model_logprobs) -> float:
    """Token-mean NLL (nats) of ``model`` over the response tokens of ``batches``, eval mode."""
    model.eval()
    total, tokens = mx.array(0.0), 0
    for mb in batches:
        logp = logprobs_fn(model, mb.inputs, mb.targets)[0]
        total = total + (-logp * mb.mask).sum()
        tokens += mb.tokens
        mx.eval(total)
    return total.item() / max(tokens, 1)
