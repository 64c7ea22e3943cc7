"""The MLX training loop: refresh, step and report phases (docs/objective.md sections 2 and 3).

:func:`train` takes a model, an optimizer, an iterator of :class:`~psft_mlx.data.MicroBatch`
and the run's :class:`~psft_plugin.config.Settings` (the objective, its resolved options, the
window K and the warm-up, as the core resolver validated them); it returns one record per
optimizer step. It knows nothing about files or YAML: evaluation, saving and reporting are passed in,
like mlx-lm's ``train``, so the parity suite can drive it with its own model and data order.

Schedule: as in mlx-lm, ``iters``, ``steps_per_report``, ``steps_per_eval`` and ``save_every``
count iterations (micro-batches); the optimizer updates every ``grad_accumulation_steps``
iterations, so ``iters // GA`` optimizer steps are taken.

Old policy: every K = ``settings.refresh_steps`` optimizer steps the loop takes the next K × GA
micro-batches, stamps each with its log-probs under the current weights (eval mode, no
gradient, no model copy), then runs K optimizer steps on them in order. The first GA
micro-batches of a window are not stamped: r = 1 there, so the training forward's own
``stop_gradient(logp)`` is their old log-prob. The schedule is :mod:`psft_plugin.window`, the
torch trainer's too: windows are aligned to the optimizer step counter, so a run resumed in the
middle of a window trains a shortened one up to the next boundary.

Aggregation: each micro-batch loss is computed with ``num_tokens=1`` (a plain sum over its
tokens or rows) and multiplied by ``1 / D``, D = the whole optimizer step's denominator; the
gradients are summed and applied once. That equals ``num_tokens=D`` but keeps D an array
input, so ``mx.compile`` does not retrace every step.

Cost per iteration: one ``mx.eval`` (the update is evaluated with the last micro-batch), one
host read of the step's scalars, and the entropy metric only on the micro-batch that closes
a report (a softmax over the vocabulary is ~5% of a small model's step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from psft_mlx.data import MicroBatch
from psft_mlx.loss import token_entropy, token_logprobs
from psft_plugin.config import Settings
from psft_plugin.metrics import ENTROPY, TOKENS, combine, prefixed
from psft_plugin.objective import Objective
from psft_plugin.window import FIRST, SFT, Window, open_window

PART_KEYS = ("loss", "loss_sum", "denominator")
"""A micro-batch part's own values beside its metrics (see :func:`step_parts`); not metrics themselves."""
LogprobsFn = Callable[[nn.Module, mx.array, mx.array], tuple[mx.array, Optional[mx.array]]]


@dataclass
class LoopArgs:
    """Schedule of the loop, in iterations (micro-batches) as mlx-lm counts them.

    ``start_iteration``: iterations already trained (a resumed run); the step counter, the
    reports and the checkpoint numbers continue from there, up to iteration ``iters``.
    ``start_tokens``: response tokens those iterations trained; ``trained_tokens`` continues from it.
    """

    iters: int
    grad_accumulation_steps: int = 1
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    clear_cache_threshold: int = 0
    compile: bool = True
    start_iteration: int = 0
    start_tokens: float = 0.0


class Callback(Protocol):
    """mlx-lm's ``TrainingCallback`` interface: dicts of Python numbers."""

    def on_train_loss_report(self, train_info: dict) -> None: ...

    def on_val_loss_report(self, val_info: dict) -> None: ...


def model_logprobs(model: nn.Module, inputs: mx.array, targets: mx.array) -> tuple[mx.array, Optional[mx.array]]:
    """Forward ``[B, T]`` inputs; return float32 ``[B, T]`` target log-probs and token entropies.

    A replacement (e.g. a chunked kernel that never holds ``[B, T, V]`` logits) may return
    ``None`` for the entropies: the metric is then left out. MLX is lazy, so callers that use
    only the log-probs (refresh, evaluation, steps without the entropy metric) never compute
    the entropies.
    """
    logits = model(inputs)
    return token_logprobs(logits, targets), token_entropy(logits)


def make_step_fn(
    model: nn.Module,
    loss_fn: Callable,
    loss_kwargs: Mapping[str, Any],
    logprobs_fn: LogprobsFn = model_logprobs,
    compile: bool = True,
    with_entropy: bool = True,
) -> Callable:
    """``fn(inputs, targets, mask, old_logp|None, scale) -> ((loss, metrics), grads)`` for one micro-batch.

    ``old_logp=None`` takes the old policy from this forward (r = 1). ``scale`` (0-dim array)
    is ``1 / step denominator``. Every varying value is an argument, never a captured array:
    ``mx.compile`` would freeze a capture at its first value. ``with_entropy=False`` leaves
    the entropy metric out (and uncomputed).
    """

    def objective(inputs, targets, mask, old_logp, scale):
        logp, entropy = logprobs_fn(model, inputs, targets)
        old = mx.stop_gradient(logp) if old_logp is None else old_logp
        loss, metrics = loss_fn(logp, old, mask, num_tokens=1.0, **loss_kwargs)
        if with_entropy and entropy is not None:
            metrics = {**metrics, ENTROPY: (entropy * mask).sum() / mx.maximum(mask.sum(), 1.0)}
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
    """The metrics of micro-batch parts (or step records) combined as :func:`psft_plugin.metrics.combine` says.

    Every metric the objective's loss returns is kept; ``loss``, ``loss_sum`` and ``denominator``
    (:data:`PART_KEYS`) are the caller's to combine.
    """
    return combine([{name: value for name, value in part.items() if name not in PART_KEYS} for part in parts])


def step_parts(
    model: nn.Module, optimizer, step_fns: Sequence[Callable], group: Sequence[MicroBatch], agg: str
) -> list[dict[str, float]]:
    """Accumulate gradients over ``group`` (one step's micro-batches), update once.

    ``step_fns[i]`` runs micro-batch ``i``. Returns each micro-batch's values: ``loss`` (its
    share of the step's objective), ``loss_sum`` and ``denominator`` (its own sum and count of
    the aggregation: tokens for ``token-mean``, sequences otherwise) and its metrics. One
    ``mx.eval`` per micro-batch (the last one also evaluates the update), one host read for the
    whole step.
    """
    denominator = step_denominator(group, agg)
    scale = mx.array(1.0 / denominator if denominator > 0 else 0.0)
    own = [mb.tokens if agg == "token-mean" else mb.rows for mb in group]
    grads, values = None, []
    for index, (mb, step_fn) in enumerate(zip(group, step_fns)):
        (loss, metrics), mb_grads = step_fn(mb.inputs, mb.targets, mb.mask, mb.old_logp, scale)
        grads = mb_grads if grads is None else tree_map(mx.add, grads, mb_grads)
        values.append((["loss", *metrics], mx.stack([loss, *metrics.values()]).astype(mx.float32)))
        if index < len(group) - 1:
            mx.eval(grads, values[-1][1])
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state, values[-1][1])
    parts = [dict(zip(names, array.tolist())) for names, array in values]
    return [{**p, "loss_sum": p["loss"] * denominator, "denominator": float(d)} for p, d in zip(parts, own)]


def optimizer_step(
    model: nn.Module, optimizer, step_fn: Callable, group: Sequence[MicroBatch], agg: str
) -> dict[str, float]:
    """One optimizer step over ``group`` with ``step_fn``; the step's loss and combined metrics."""
    parts = step_parts(model, optimizer, [step_fn] * len(group), group, agg)
    return {"loss": sum(p["loss"] for p in parts), **combine_metrics(parts)}


def stamp_old_logp(
    model: nn.Module, micro_batches: Iterable[MicroBatch], logprobs_fn: LogprobsFn = model_logprobs
) -> None:
    """Refresh phase: set ``old_logp`` of each micro-batch from the current weights.

    Eval mode (dropout off) and no gradient; the weights are not copied.
    """
    was_training = model.training
    model.eval()
    for mb in micro_batches:
        mb.old_logp = mx.stop_gradient(logprobs_fn(model, mb.inputs, mb.targets)[0])
        mx.eval(mb.old_logp)
    model.train(was_training)


class Reporter:
    """Report phase: aggregates micro-batch values between reports and times the training work.

    ``train_loss`` is the objective aggregated over the window's micro-batches (for
    ``token-mean``: its sum over their response tokens / their count), so a report in the
    middle of an optimizer step is well defined. mlx-lm reports the mean of micro-batch
    means: the same when the micro-batches hold the same number of tokens.
    """

    def __init__(self, optimizer, callback: Optional[Callback], trained_tokens: float = 0.0):
        self.optimizer, self.callback = optimizer, callback
        self.pending: list[dict[str, float]] = []
        self.train_time, self.iterations = 0.0, 0
        self.trained_tokens = trained_tokens

    def add(self, part: dict[str, float], seconds: float) -> None:
        """One iteration's values (see :func:`step_parts`) and the seconds it took."""
        self.pending.append(part)
        self.iterations += 1
        self.train_time += seconds
        self.trained_tokens += part.get(TOKENS, 0.0)

    def report(self, iteration: int) -> Optional[dict[str, float]]:
        """Aggregate the pending iterations into one report and pass it to the callback.

        A window without any response token is not reported (it has no loss; the caller
        counts such steps).
        """
        metrics = combine_metrics(self.pending)
        seconds, iterations = max(self.train_time, 1e-9), self.iterations
        denominator = sum(p["denominator"] for p in self.pending)
        info = None
        if denominator > 0:
            info = {
                "iteration": iteration,
                "train_loss": sum(p["loss_sum"] for p in self.pending) / denominator,
                **prefixed(metrics),
                "learning_rate": self.optimizer.learning_rate.item(),
                "iterations_per_second": iterations / seconds,
                "tokens_per_second": metrics[TOKENS] / seconds,
                "trained_tokens": self.trained_tokens,
                "peak_memory": mx.get_peak_memory() / 1e9,
            }
            if self.callback is not None:
                self.callback.on_train_loss_report(info)
        self.pending, self.train_time, self.iterations = [], 0.0, 0
        return info


def resolve_loss(objective: Objective, options: Mapping[str, Any]) -> tuple[Callable, dict[str, Any]]:
    """The objective's MLX loss and its keyword arguments from resolved ``options``."""
    return objective.loss_fn("mlx"), objective.loss_kwargs(options)


Evaluate = Callable[[nn.Module], tuple[float, int]]
"""``evaluate(model) -> (nll, tokens)``: validation NLL (nats per response token; nan without any) and its token count."""


def _run_eval(evaluate: Optional[Evaluate], model: nn.Module, iteration: int, callback: Optional[Callback]) -> None:
    """Validate and report ``val_loss``, ``val_time`` (s) and ``val_tokens`` (0: ``val_loss`` is nan)."""
    if evaluate is None:
        return
    tic = time.perf_counter()
    val_loss, val_tokens = evaluate(model)
    model.train()
    if callback is not None:
        callback.on_val_loss_report(
            {
                "iteration": iteration,
                "val_loss": val_loss,
                "val_time": time.perf_counter() - tic,
                "val_tokens": val_tokens,
            }
        )


@dataclass
class StepFns:
    """The compiled micro-batch functions of one objective: without and with the entropy metric."""

    plain: Callable
    with_entropy: Callable

    @classmethod
    def build(
        cls, model: nn.Module, objective: Objective, options: Mapping[str, Any], logprobs_fn: LogprobsFn, compile: bool
    ) -> "StepFns":
        loss_fn, kwargs = resolve_loss(objective, options)
        return cls(
            make_step_fn(model, loss_fn, kwargs, logprobs_fn, compile, with_entropy=False),
            make_step_fn(model, loss_fn, kwargs, logprobs_fn, compile, with_entropy=True),
        )

    def for_iterations(self, first: int, count: int, args: LoopArgs) -> list[Callable]:
        """One function per iteration ``first .. first+count-1``: entropy where a report closes."""
        last = args.iters - args.iters % args.grad_accumulation_steps
        return [
            self.with_entropy if (it % args.steps_per_report == 0 or it == last) else self.plain
            for it in range(first, first + count)
        ]


@dataclass
class Phases:
    """What one run's step phase needs: the step functions of each window group kind and the schedule."""

    main: StepFns
    warm: Optional[StepFns]
    settings: Settings
    args: LoopArgs

    @classmethod
    def build(
        cls,
        model: nn.Module,
        settings: Settings,
        args: LoopArgs,
        logprobs_fn: LogprobsFn,
        warmup_objective: Optional[Objective],
    ) -> "Phases":
        """Compile the objective's step (and the warm-up objective's, for ``settings.warmup_steps`` > 0)."""
        if settings.warmup_steps and warmup_objective is None:
            raise ValueError("settings.warmup_steps > 0 needs warmup_objective (plain SFT: the `ce` objective)")
        main = StepFns.build(model, settings.objective, settings.resolved, logprobs_fn, args.compile)
        warm = (
            StepFns.build(model, warmup_objective, settings.resolved, logprobs_fn, args.compile)
            if settings.warmup_steps
            else None
        )
        return cls(main, warm, settings, args)

    def window(
        self, window: Optional[Window], batches: Iterator[MicroBatch], step: int, stamp: Callable
    ) -> Optional[Window]:
        """Refresh phase: the window serving optimizer step ``step`` (a new one, stamped, when needed); None at the end."""
        if window is not None and window.serves(batches):
            return window
        ga = self.args.grad_accumulation_steps
        window = open_window(  # the window schedule counts steps from 0
            batches,
            step - 1,
            max_steps=self.args.iters // ga,
            refresh_steps=self.settings.refresh_steps,
            warmup_steps=self.settings.warmup_steps,
            first_size=ga,
            group_size=ga,
            whole_groups_only=True,
            stamp=stamp,
        )
        return window if window.groups else None

    def step(self, model: nn.Module, optimizer, window: Window, step: int) -> tuple[dict[str, float], list[dict]]:
        """Step phase: optimizer step ``step`` on the window's next group; its record and its micro-batch parts."""
        group, kind = window.pop()
        fns = self.warm if kind == SFT else self.main
        ga = self.args.grad_accumulation_steps
        learning_rate = optimizer.learning_rate.item()
        first = (step - 1) * ga + 1
        parts = step_parts(model, optimizer, fns.for_iterations(first, ga, self.args), group, self.settings.loss_agg)
        record = {
            "step": step,
            "iteration": step * ga,
            "refresh": float(self.settings.objective.uses_old_policy and kind == FIRST),
            "learning_rate": learning_rate,
            "loss": sum(p["loss"] for p in parts),
            **combine_metrics(parts),
        }
        return record, parts


def train(
    model: nn.Module,
    optimizer,
    batches: Iterable[MicroBatch],
    settings: Settings,
    args: LoopArgs,
    *,
    callback: Optional[Callback] = None,
    evaluate: Optional[Evaluate] = None,
    save: Optional[Callable[[int, float], None]] = None,
    logprobs_fn: LogprobsFn = model_logprobs,
    warmup_objective: Optional[Objective] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> list[dict[str, float]]:
    """Train from ``args.start_iteration`` to ``args.iters`` iterations: one optimizer step per GA.

    ``settings`` (:func:`psft_plugin.config.resolve`) names the objective, its resolved options,
    the refresh window K and the warm-up. ``warmup_objective`` (plain SFT, ``ce``) trains the
    first ``settings.warmup_steps`` optimizer steps. ``save(iteration, trained_tokens)`` is
    called every ``save_every`` iterations, ``progress(n)`` each time ``n`` more iterations are
    done. Returns one record per optimizer step: ``step``, ``iteration`` (its last), ``loss``,
    ``tokens``, ``refresh`` (1 if the old policy was refreshed for it), ``learning_rate`` and the
    objective's metrics. Stops early if ``batches`` runs out.
    """
    phases = Phases.build(model, settings, args, logprobs_fn, warmup_objective)
    batches, ga = iter(batches), args.grad_accumulation_steps
    reporter, records, window = Reporter(optimizer, callback, args.start_tokens), [], None
    model.train()
    if args.start_iteration == 0:
        _run_eval(evaluate, model, 0, callback)
    for step in range(args.start_iteration // ga + 1, args.iters // ga + 1):
        tic = time.perf_counter()
        window = phases.window(window, batches, step, lambda mbs: stamp_old_logp(model, mbs, logprobs_fn))
        if window is None:
            break
        record, parts = phases.step(model, optimizer, window, step)
        records.append(record)
        _clear_cache(args.clear_cache_threshold)
        seconds = (time.perf_counter() - tic) / ga
        for iteration, part in enumerate(parts, (step - 1) * ga + 1):  # report phase
            reporter.add(part, seconds)
            if progress is not None:
                progress(1)
            _after_iteration(iteration, args, reporter, evaluate, save, model, callback, settings.warmup_steps * ga)
    _finish(records, args, reporter, evaluate, model, callback)
    return records


def _after_iteration(
    iteration: int, args: LoopArgs, reporter: Reporter, evaluate, save, model, callback, warmup_iterations: int
) -> None:
    """Report, evaluate and save on their schedules; a report never mixes SFT warm-up and PSFT steps."""
    if iteration % args.steps_per_report == 0 or iteration == warmup_iterations:
        reporter.report(iteration)
    if iteration % args.steps_per_eval == 0:
        _run_eval(evaluate, model, iteration, callback)
    if save is not None and iteration % args.save_every == 0:
        save(iteration, reporter.trained_tokens)


def _finish(records: Sequence[dict], args: LoopArgs, reporter: Reporter, evaluate, model, callback) -> None:
    """The last report and validation, unless the schedule has just made them."""
    if not records:
        return
    last = int(records[-1]["iteration"])
    if reporter.iterations:
        reporter.report(last)
    if last % args.steps_per_eval:
        _run_eval(evaluate, model, last, callback)


def _clear_cache(threshold: int) -> None:
    if threshold and mx.get_cache_memory() > threshold:
        mx.clear_cache()


def evaluate_nll(
    model: nn.Module, batches: Iterable[MicroBatch], logprobs_fn: LogprobsFn = model_logprobs
) -> tuple[float, int]:
    """Token-mean NLL (nats) of ``model`` over the response tokens of ``batches`` (eval mode) and their count.

    Without any response token (no batch, or every response masked or cut) the NLL is nan, as
    in mlx-lm's ``evaluate``: a 0 would read as a perfect model.
    """
    model.eval()
    total, tokens = mx.array(0.0), 0
    for mb in batches:
        logp = logprobs_fn(model, mb.inputs, mb.targets)[0]
        total = total + (-logp * mb.mask).sum()
        tokens += mb.tokens
        mx.eval(total)
    return (total.item() / tokens if tokens else math.nan), tokens
