"""A ``transformers.Trainer`` mixin that trains any registered objective, PSFT included.

PSFT_SPEC.md sections 2 and 3. Mix it in front of any ``Trainer`` subclass::

    class MyTrainer(PSFTTrainerMixin, Trainer): ...
    trainer = MyTrainer(model=..., args=..., psft_config={"loss": "psft", "psft_refresh_steps": 8})

How it hooks into the host (transformers 5):

- ``get_batch_samples`` (called once per optimizer step with the gradient-accumulation
  micro-batches) serves the step from an old-policy window: at a window start it prefetches
  ``K`` steps of micro-batches and stamps old log-probs on all but the first step's, under
  ``no_grad`` with dropout off and the current weights. No copy of the model is kept; the
  first step reuses its own training forward (``logp.detach()``, r = 1 exactly).
- The loss is installed as the host's ``compute_loss_func``, so the host still runs its own
  ``compute_loss`` (Axolotl's token bookkeeping, model-specific input fixes) and its
  normalisation: the micro-batch loss is divided by the step's response-token count over
  all micro-batches and ranks (``num_items_in_batch``), the host skips its division by the
  accumulation steps and multiplies by the number of processes, which DDP's gradient mean
  undoes. ``args.average_tokens_across_devices`` is forced on so the count is global.
- Evaluation uses plain token-mean NLL, so ``eval_loss`` stays cross-entropy.
- Step metrics (token-weighted over the step's micro-batches and ranks) go through
  :meth:`PSFTTrainerMixin.psft_record`; by default they are added to the next training log.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from transformers import Trainer
from typing_extensions import override

from psft_plugin import ConfigError, default_registry, get_objective
from psft_plugin.objective import Objective
from psft_plugin.options import unknown_keys
from psft_torch.loss import token_entropy, token_logprobs
from psft_torch.window import FIRST, SFT, STAMPED, Window, take_groups, window_length

OLD_LOGP_KEY = "psft_old_logp"
IGNORE_INDEX = -100
FUSED_LOSS_HINT = (
    "PSFT needs the model's logits to compute per-token log-probabilities. Turn off fused "
    "loss kernels that skip them (Axolotl: `cut_cross_entropy`, `liger_fused_linear_cross_entropy`)."
)
METRIC_PREFIX = "psft/"


@dataclass(frozen=True)
class PSFTSettings:
    """A validated trainer configuration: the objective, its loss and the window sizes."""

    objective: Objective
    resolved: Mapping[str, Any]
    refresh_steps: int
    warmup_steps: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], default_loss: str = "psft") -> "PSFTSettings":
        """Validate ``{"loss": name, "psft_*": value}``; raises :class:`ConfigError` listing every problem."""
        registry = default_registry()
        problems = unknown_keys(config, registry.option_keys(), prefix="psft_")
        objective = registry.get(config.get("loss") or default_loss)
        try:
            resolved = objective.resolve(config)
        except ConfigError as error:
            raise ConfigError(problems + error.problems) from None
        if problems:
            raise ConfigError(problems)
        uses_window = objective.uses_old_policy
        return cls(
            objective=objective,
            resolved=resolved,
            refresh_steps=int(resolved.get("psft_refresh_steps", 1)) if uses_window else 1,
            warmup_steps=int(resolved.get("psft_warmup_steps", 0)) if uses_window else 0,
        )

    def loss(self, kind: str) -> tuple[Callable[..., Any], dict[str, Any]]:
        """The loss function and its keyword arguments for a group ``kind`` (warm-up trains CE)."""
        objective = get_objective("ce") if kind == SFT else self.objective
        return objective.loss_fn("torch"), objective.loss_kwargs(self.resolved)

    @property
    def agg(self) -> str:
        return self.resolved.get("psft_loss_agg", "token-mean")


def aligned_targets(labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, T]`` targets aligned with ``[B, T, V]`` logits, shifted as transformers' causal LM loss does.

    ``targets[:, t] = labels[:, t + 1]``; the last position gets ``-100``. A collator's own
    ``shift_labels`` are already aligned and used as given.
    """
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        raise ValueError("the batch has neither `labels` nor `shift_labels`; PSFT trains on labelled tokens only")
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def model_logits(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """The ``[B, T, V]`` logits of a model output, or a clear error when a kernel skipped them."""
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None or logits.dim() != 3:
        raise RuntimeError(f"the model returned no [B, T, V] logits. {FUSED_LOSS_HINT}")
    if logits.shape[:2] != targets.shape:
        raise RuntimeError(
            f"the model returned logits for {tuple(logits.shape[:2])} positions but the labels cover "
            f"{tuple(targets.shape)} (`logits_to_keep` or a fused kernel truncated them). {FUSED_LOSS_HINT}"
        )
    return logits


ENTROPY_CHUNK_ELEMENTS = 2**24  # 64 MiB of float32 per temporary


@torch.no_grad()
def masked_entropy_sum(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of the predictive entropy (nats), a few positions at a time.

    Chunking bounds the float32 temporaries to ~``ENTROPY_CHUNK_ELEMENTS`` instead of
    ``B x T x V`` (which is gigabytes for a 150k vocabulary).
    """
    chunk = max(1, ENTROPY_CHUNK_ELEMENTS // logits.shape[-1])
    flat, keep = logits.detach().reshape(-1, logits.shape[-1]), mask.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start:start + chunk][keep[start:start + chunk]]
        if rows.numel():
            total = total + token_entropy(rows.unsqueeze(0)).sum()
    return total


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """Reduce across data-parallel ranks when running distributed (a no-op otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op))
    return tensor


@dataclass
class StepMetrics:
    """Token-weighted sums of one optimizer step's micro-batch metrics (on the model's device)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    ratio_min: Optional[torch.Tensor] = None
    ratio_max: Optional[torch.Tensor] = None

    def add(self, loss: torch.Tensor, metrics: Mapping[str, torch.Tensor], entropy_sum: torch.Tensor) -> None:
        """Add one micro-batch: its loss (already divided by the step's count) and its metrics."""
        tokens = metrics["tokens"].detach().float()
        parts = {"tokens": tokens, "entropy": entropy_sum, "objective": loss.detach().float()}
        parts.update({k: v.detach().float() * tokens for k, v in metrics.items()
                      if k not in ("tokens", "ratio_min", "ratio_max")})
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        if "ratio_min" in metrics:
            inf = torch.full_like(tokens, math.inf)
            low = torch.where(tokens > 0, metrics["ratio_min"].detach().float(), inf)
            high = torch.where(tokens > 0, metrics["ratio_max"].detach().float(), -inf)
            self.ratio_min = low if self.ratio_min is None else torch.minimum(self.ratio_min, low)
            self.ratio_max = high if self.ratio_max is None else torch.maximum(self.ratio_max, high)

    def reduce(self) -> dict[str, float]:
        """Step means over all ranks: ``{"psft/<name>": value}`` (one collective per reduction)."""
        names = sorted(self.sums)
        totals = dict(zip(names, _all_reduce(torch.stack([self.sums[n] for n in names]), "SUM").tolist()))
        tokens = totals.pop("tokens")
        out = {name: value / max(tokens, 1.0) for name, value in totals.items() if name != "objective"}
        out["objective"] = totals["objective"]
        if self.ratio_min is not None:
            low = _all_reduce(self.ratio_min.clone(), "MIN").item()
            high = _all_reduce(self.ratio_max.clone(), "MAX").item()
            out["ratio_min"], out["ratio_max"] = (low, high) if math.isfinite(low) else (1.0, 1.0)
        return {METRIC_PREFIX + name: value for name, value in out.items()}


@dataclass
class _Step:
    """The optimizer step being trained: its group kind, size, loss denominator and metrics."""

    kind: str
    size: int
    denominator: Optional[float]
    seen: int = 0
    metrics: StepMetrics = field(default_factory=StepMetrics)


def average_records(records: list[dict[str, float]]) -> dict[str, float]:
    """Combine per-step metric dicts for one log line: min of minima, max of maxima, mean otherwise."""
    reducers = {METRIC_PREFIX + "ratio_min": min, METRIC_PREFIX + "ratio_max": max}
    keys = {key for record in records for key in record}
    combined = {}
    for key in sorted(keys):
        values = [record[key] for record in records if key in record]
        combined[key] = reducers.get(key, lambda v: sum(v) / len(v))(values)
    return combined


def _check_data_parallel(accelerator_processes: int) -> None:
    """Refuse to train when several processes run but the accelerator does not see them.

    On a CPU-only machine accelerate ignores ``torchrun``'s ranks unless ``ACCELERATE_USE_CPU``
    is set: every rank would then train its own replica on the same data, unsynchronised.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1 and accelerator_processes != world:
            raise ConfigError([f"{world} processes were launched but the trainer's accelerator uses "
                               f"{accelerator_processes}: the ranks would train unsynchronised copies. On CPU "
                               f"set the environment variable ACCELERATE_USE_CPU=true (gloo data parallel)."])


class PSFTTrainerMixin:
    """Trains ``loss: <objective>`` (PSFT or CE) inside any ``transformers.Trainer`` subclass.

    Pass ``psft_config`` (``{"loss": ..., "psft_*": ...}``) to the constructor or call
    :meth:`configure_psft` before ``train()``. See the module docstring for the mechanics.
    """

    def __init__(self, *args: Any, psft_config: Optional[Mapping[str, Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._psft: Optional[PSFTSettings] = None
        self._psft_window: Optional[Window] = None
        self._psft_step: Optional[_Step] = None
        self._psft_pending: dict[str, Any] = {}
        self._psft_stamping = False
        self._psft_stamped: Optional[torch.Tensor] = None
        self._psft_records: list[dict[str, float]] = []
        if psft_config is not None:
            self.configure_psft(psft_config)

    def configure_psft(self, config: Mapping[str, Any], default_loss: str = "psft") -> PSFTSettings:
        """Validate ``config`` and install the objective as this trainer's loss."""
        settings = PSFTSettings.from_config(config, default_loss=default_loss)
        if self.compute_loss_func is not None and self.compute_loss_func != self._psft_loss_func:
            raise ConfigError([f"the trainer already has a `compute_loss_func` ({self.compute_loss_func!r}); "
                               f"`loss: {settings.objective.name}` computes the loss itself, remove the other one"])
        if not getattr(self, "_loss_shifts_labels", True):
            raise ConfigError([f"`loss: {settings.objective.name}` supports causal language models only "
                               f"(labels shifted by one); this model's loss does not shift its labels"])
        _check_data_parallel(self.accelerator.num_processes)
        self.compute_loss_func = self._psft_loss_func
        # The step's response-token count must span all ranks (spec section 3); transformers
        # then multiplies each micro-batch loss by the process count, which DDP's mean undoes.
        self.args.average_tokens_across_devices = True
        self._psft = settings
        return settings

    # ----- the old-policy window -----------------------------------------------------------
    @override
    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        if self._psft is None:
            raise RuntimeError("PSFTTrainerMixin: call configure_psft(...) (or pass psft_config=) before train()")
        if self._psft_window is None or not self._psft_window.serves(epoch_iterator):
            self._psft_window = self._psft_open_window(epoch_iterator, num_batches)
        group, kind = self._psft_window.pop()
        num_items = self._get_num_items_in_batch(group, device)
        self._psft_step = _Step(kind, len(group), self._psft_denominator(group, num_items, device))
        return group, num_items

    def _psft_open_window(self, iterator: Iterator, num_batches: int) -> Window:
        """Prefetch the window's groups and stamp old log-probs on all but the first."""
        settings, step = self._psft, self.state.global_step
        length = window_length(step, self.state.max_steps, settings.refresh_steps, settings.warmup_steps)
        groups = take_groups(iterator, num_batches, self.args.gradient_accumulation_steps, length)
        self._psft_stamp([batch for group in groups[1:] for batch in group])
        kinds = [SFT if step < settings.warmup_steps else FIRST] + [STAMPED] * (len(groups) - 1)
        return Window(iterator, deque(zip(groups, kinds)))

    @torch.no_grad()
    def _psft_stamp(self, batches: list[dict]) -> None:
        """Store ``batch[OLD_LOGP_KEY]`` (``[B, T]`` float32) from the current weights, dropout off.

        Runs the host's own ``compute_loss`` path (same input handling as training) in eval
        mode; the loss function sees ``_psft_stamping`` and only records the log-probs.
        """
        if not batches:
            return
        model = self.model_wrapped if (self.is_fsdp_enabled or self.is_deepspeed_enabled) else self.model
        was_training = model.training
        model.eval()
        self._psft_stamping = True
        try:
            for batch in batches:
                inputs = self._prepare_inputs({k: v for k, v in batch.items() if k != OLD_LOGP_KEY})
                with self.compute_loss_context_manager():
                    self.compute_loss(model, inputs)
                batch[OLD_LOGP_KEY] = self._psft_stamped
        finally:
            self._psft_stamping, self._psft_stamped = False, None
            model.train(was_training)

    def _psft_denominator(self, group: list[dict], num_items: Any, device: torch.device) -> Optional[float]:
        """The step's loss denominator over all micro-batches and ranks (spec section 3).

        ``token-mean``: the host's response-token count (global once ``average_tokens_across_devices``
        is on). The ``seq-mean-*`` modes: the number of sequences with a response token.
        """
        if self._psft.agg == "token-mean":
            return None if num_items is None else float(num_items)
        rows = torch.zeros((), dtype=torch.float32, device=device)
        for batch in group:
            targets = aligned_targets(batch.get("labels"), batch.get("shift_labels"))
            rows = rows + ((targets != IGNORE_INDEX).sum(dim=1) > 0).sum().to(device)
        return float(_all_reduce(rows, "SUM").item())

    # ----- the loss ------------------------------------------------------------------------
    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._psft is not None:
            # Our keys must not reach the model's forward; the loss function picks them up here.
            self._psft_pending = {
                "old_logp": inputs.pop(OLD_LOGP_KEY, None),
                "shift_labels": inputs.pop("shift_labels", None),
                "training": model.training,
            }
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _psft_loss_func(self, outputs: Any, labels: Optional[torch.Tensor], num_items_in_batch: Any = None):
        """The host's ``compute_loss_func``: one micro-batch's share of the step's loss."""
        pending = self._psft_pending
        targets = aligned_targets(labels, pending.get("shift_labels"))
        logits = model_logits(outputs, targets)
        logp, mask = token_logprobs(logits, targets), targets != IGNORE_INDEX
        if self._psft_stamping:
            self._psft_stamped = logp.detach()
            return logp.new_zeros(())
        if not pending.get("training", False):  # evaluation: plain NLL over this batch
            fn, kwargs = self._psft.loss(SFT)
            return fn(logp, None, mask, **kwargs)[0]
        return self._psft_train_loss(logits, logp, mask, pending.get("old_logp"))

    def _psft_train_loss(self, logits, logp, mask, old_logp) -> torch.Tensor:
        """Loss of one training micro-batch; closes the step's metrics after its last one."""
        step = self._psft_step
        if step is None or step.denominator is None:
            raise RuntimeError("PSFT could not count the step's response tokens: the batches carry no `labels`")
        if step.kind == STAMPED and old_logp is None:
            raise RuntimeError("PSFT: a stamped micro-batch lost its old log-probs before the loss (host bug?)")
        old = old_logp if step.kind == STAMPED else logp.detach()
        fn, kwargs = self._psft.loss(step.kind)
        loss, metrics = fn(logp, old, mask, num_tokens=step.denominator, **kwargs)
        step.metrics.add(loss, metrics, masked_entropy_sum(logits, mask))
        step.seen += 1
        if step.seen == step.size:
            self.psft_record(step.metrics.reduce())
        return loss

    # ----- metrics -------------------------------------------------------------------------
    def psft_record(self, metrics: dict[str, float]) -> None:
        """Receive one optimizer step's metrics; the default adds them to the next training log."""
        self._psft_records.append(metrics)

    @override
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._psft_records:
            logs.update(average_records(self._psft_records))
            self._psft_records = []
        return super().log(logs, *args, **kwargs)


class PSFTTrainer(PSFTTrainerMixin, Trainer):
    """``transformers.Trainer`` with a registered objective: ``PSFTTrainer(..., psft_config={...})``."""
