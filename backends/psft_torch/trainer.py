"""A ``transformers.Trainer`` mixin that trains any registered objective, PSFT included.

docs/objective.md sections 2 and 3. Mix it in front of any ``Trainer`` subclass::

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
- Checkpoints carry the window: with every checkpoint each rank writes the old log-probs of its
  micro-batches not trained yet (:mod:`psft_torch.resume`), and ``train(resume_from_checkpoint=...)``
  puts them back on the same micro-batches, so a resume from inside a window is exact; a
  checkpoint without them (or whose micro-batches differ) is restamped with a warning.
- Where the per-token log-probs come from is one :class:`LogprobPath`, chosen once in
  :meth:`PSFTTrainerMixin.configure_psft` from ``psft_lm_head_chunk_size``: the model's full
  ``[B, T, V]`` logits (0), or the LM head applied N response tokens at a time inside the model's
  forward (:mod:`psft_torch.lm_head`), for the training forward, the old-policy stamp and
  evaluation alike, whatever the objective.
- Step metrics (token-weighted over the step's micro-batches and ranks) go through
  :meth:`PSFTTrainerMixin.psft_record`; by default they are added to the next training log.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from typing_extensions import override

from psft_plugin import get_objective
from psft_plugin.config import LOSS_OPTION, Settings, resolve
from psft_plugin.metrics import ENTROPY, MEAN, MIN, OBJECTIVE, SUM, TOKENS, combine_steps, prefixed, reduction
from psft_plugin.objectives import LM_HEAD_CHUNK_KEY
from psft_plugin.spec import IGNORE_INDEX
from psft_plugin.window import SFT, STAMPED, Window, open_window, starts_window, window_length
from psft_torch import resume
from psft_torch.lm_head import ENTROPY_KEY, LOGP_KEY, install_chunked_head, remove_chunked_head
from psft_torch.loss import token_logprobs_and_entropy

LOG = logging.getLogger(__name__)
OLD_LOGP_KEY = "psft_old_logp"
FUSED_LOSS_HINT = (
    "PSFT needs the model's logits to compute per-token log-probabilities. Turn off fused "
    "loss kernels that skip them (Axolotl: `cut_cross_entropy`, `liger_fused_linear_cross_entropy`); "
    f"`{LM_HEAD_CHUNK_KEY}: 1024` saves the same memory (no [B, T, V] logits)."
)


@dataclass(frozen=True)
class PSFTSettings(Settings):
    """The core :class:`~psft_plugin.config.Settings` plus the torch loss of each window group kind."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any], host_problems: Sequence[str] = ()) -> "PSFTSettings":
        """Validate ``{"loss": name, "psft_*": value}`` with the core resolver (every other key is unknown).

        Raises :class:`ConfigError` listing every problem, ``host_problems`` (the trainer's own) included.
        """
        settings = resolve(config, closed=True, host_problems=host_problems)
        return cls(**{f.name: getattr(settings, f.name) for f in fields(Settings)})

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


LogprobsFn = Callable[[Any, torch.Tensor, bool], tuple[torch.Tensor, Optional[torch.Tensor]]]
"""``(model outputs, [B, T] targets, entropy?) -> ([B, T] float32 log-probs, [B, T] entropy or None)``."""


@dataclass(frozen=True)
class LogprobPath:
    """Where a micro-batch's per-token log-probs come from: the trainer's one switch between paths.

    ``forward_kwargs(targets, entropy)`` are extra keyword arguments for the model's forward;
    ``logprobs`` reads the log-probs (with gradient) and, when asked, the entropy from its output.
    """

    name: str
    forward_kwargs: Callable[[torch.Tensor, bool], dict[str, Any]]
    logprobs: LogprobsFn


def full_logits_logprobs(
    outputs: Any, targets: torch.Tensor, entropy: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """From the model's ``[B, T, V]`` logits (``psft_lm_head_chunk_size: 0``), the entropy in the same pass."""
    return token_logprobs_and_entropy(model_logits(outputs, targets), targets, entropy=entropy)


def chunked_head_logprobs(
    outputs: Any, targets: torch.Tensor, entropy: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """From the ``psft_logp`` / ``psft_entropy`` the patched forward returns (:mod:`psft_torch.lm_head`)."""
    logp = outputs.get(LOGP_KEY) if isinstance(outputs, Mapping) else None
    if logp is None or logp.shape != targets.shape:
        raise RuntimeError(
            f"`{LM_HEAD_CHUNK_KEY}` is set but the model's forward returned no {tuple(targets.shape)} "
            f"`{LOGP_KEY}`: something replaced the patched forward after the trainer was configured"
        )
    return logp, outputs.get(ENTROPY_KEY) if entropy else None


FULL_LOGITS = LogprobPath("full logits", lambda targets, entropy: {}, full_logits_logprobs)


def logprob_path(model: torch.nn.Module, chunk_size: int, sharded: bool = False) -> LogprobPath:
    """The path for ``psft_lm_head_chunk_size: chunk_size``; installs (or removes) the model patch.

    ``sharded`` (ZeRO-3, FSDP): every rank makes the same number of LM-head calls.
    """
    if chunk_size == 0:
        remove_chunked_head(model)
        return FULL_LOGITS
    head = install_chunked_head(model, chunk_size, balance_chunks=sharded)
    return LogprobPath(f"LM head in chunks of {chunk_size} tokens", head.forward_kwargs, chunked_head_logprobs)


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """Reduce across data-parallel ranks when running distributed (a no-op otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op))
    return tensor


@dataclass
class StepMetrics:
    """One optimizer step's micro-batch metrics on the model's device, combined as :mod:`psft_plugin.metrics` says.

    ``sums``: a sum's running total, or a mean's response-token weighted total; ``weights``: a
    mean's tokens over the micro-batches that have it; ``lows``: an extreme over the micro-batches
    with tokens (a maximum negated, so that one ``MIN`` collective reduces both kinds).
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    lows: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, loss: torch.Tensor, metrics: Mapping[str, torch.Tensor], entropy_sum: torch.Tensor) -> None:
        """Add one micro-batch: its loss (already divided by the step's count), its metrics, its entropy sum."""
        tokens = metrics[TOKENS].detach().float()
        values = {
            name: torch.as_tensor(value, device=tokens.device).detach().float() for name, value in metrics.items()
        }
        values[OBJECTIVE] = loss.detach().float()
        for name, value in values.items():
            kind = reduction(name)
            if kind == SUM:
                self.sums[name] = self.sums.get(name, 0.0) + value
            elif kind == MEAN:
                self._add_mean(name, value * tokens, tokens)
            else:
                low = torch.where(tokens > 0, value if kind == MIN else -value, torch.full_like(value, math.inf))
                self.lows[name] = torch.minimum(self.lows[name], low) if name in self.lows else low
        self._add_mean(ENTROPY, entropy_sum.float(), tokens)

    def _add_mean(self, name: str, weighted: torch.Tensor, tokens: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + weighted
        self.weights[name] = self.weights.get(name, 0.0) + tokens

    def reduce(self) -> dict[str, float]:
        """The step's values over all ranks: ``{"psft/<name>": value}`` (one ``SUM``, one ``MIN`` collective).

        A mean or an extreme without any response token in the step is left out.
        """
        names, weighted = sorted(self.sums), sorted(self.weights)
        totals = _all_reduce(
            torch.stack([self.sums[n] for n in names] + [self.weights[n] for n in weighted]), "SUM"
        ).tolist()
        weights = dict(zip(weighted, totals[len(names) :]))
        out = {
            name: total if name not in weights else total / weights[name]
            for name, total in zip(names, totals)
            if weights.get(name, 1.0) > 0
        }
        if self.lows:
            lows = sorted(self.lows)
            for name, low in zip(lows, _all_reduce(torch.stack([self.lows[n] for n in lows]), "MIN").tolist()):
                if math.isfinite(low):
                    out[name] = low if reduction(name) == MIN else -low
        return prefixed(out)


@dataclass
class _Step:
    """The optimizer step being trained: its group kind, size, loss denominator and metrics."""

    kind: str
    size: int
    denominator: Optional[float]
    seen: int = 0
    metrics: StepMetrics = field(default_factory=StepMetrics)


def _data_parallel_problems(accelerator_processes: int) -> list[str]:
    """Several processes run but the accelerator does not see them: a problem to refuse training with.

    On a CPU-only machine accelerate ignores ``torchrun``'s ranks unless ``ACCELERATE_USE_CPU``
    is set: every rank would then train its own replica on the same data, unsynchronised.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1 and accelerator_processes != world:
            return [
                f"{world} processes were launched but the trainer's accelerator uses "
                f"{accelerator_processes}: the ranks would train unsynchronised copies. On CPU "
                f"set the environment variable ACCELERATE_USE_CPU=true (gloo data parallel)."
            ]
    return []


class PSFTTrainerMixin:
    """Trains ``loss: <objective>`` (PSFT or CE) inside any ``transformers.Trainer`` subclass.

    Pass ``psft_config`` (``{"loss": ..., "psft_*": ...}``) to the constructor or call
    :meth:`configure_psft` before ``train()``. See the module docstring for the mechanics.
    """

    def __init__(self, *args: Any, psft_config: Optional[Mapping[str, Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._psft: Optional[PSFTSettings] = None
        self._psft_path: LogprobPath = FULL_LOGITS
        self._psft_window: Optional[Window] = None
        self._psft_step: Optional[_Step] = None
        self._psft_pending: dict[str, Any] = {}
        self._psft_stamping = False
        self._psft_stamped: Optional[torch.Tensor] = None
        self._psft_records: list[dict[str, float]] = []
        self._psft_resume: Optional[str] = None  # the checkpoint train() resumes from, until its window opens
        if psft_config is not None:
            self.configure_psft(psft_config)

    def configure_psft(self, config: Mapping[str, Any]) -> PSFTSettings:
        """Validate ``config`` (core rules and this trainer's) and install the objective as this trainer's loss."""
        settings = PSFTSettings.from_config(config, host_problems=self._psft_host_problems(config))
        sharded = bool(getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False))
        self._psft_path = logprob_path(self.model, settings.lm_head_chunk_size, sharded=sharded)
        self.compute_loss_func = self._psft_loss_func
        # The step's response-token count must span all ranks (spec section 3); transformers
        # then multiplies each micro-batch loss by the process count, which DDP's mean undoes.
        self.args.average_tokens_across_devices = True
        if not any(isinstance(callback, _SaveWindow) for callback in self.callback_handler.callbacks):
            self.add_callback(_SaveWindow(self))
        self._psft = settings
        return settings

    def _psft_host_problems(self, config: Mapping[str, Any]) -> list[str]:
        """What this trainer cannot run ``config`` with: its host's settings, not the configuration's rules."""
        name = config.get("loss") or LOSS_OPTION.default
        problems = []
        if self.compute_loss_func is not None and self.compute_loss_func != self._psft_loss_func:
            problems.append(
                f"the trainer already has a `compute_loss_func` ({self.compute_loss_func!r}); "
                f"`loss: {name}` computes the loss itself, remove the other one"
            )
        if not getattr(self, "_loss_shifts_labels", True):
            problems.append(
                f"`loss: {name}` supports causal language models only (labels shifted by one); "
                f"this model's loss does not shift its labels"
            )
        problems += _data_parallel_problems(self.accelerator.num_processes)
        return problems

    @property
    def psft_stamping(self) -> bool:
        """True while the old-policy pass runs: its forwards are no training step, hosts log nothing for them."""
        return self._psft_stamping

    @property
    def psft_logprob_path(self) -> LogprobPath:
        """Where this trainer's per-token log-probs come from (set by :meth:`configure_psft`)."""
        return self._psft_path

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
        return open_window(
            iterator,
            self.state.global_step,
            max_steps=self.state.max_steps,
            refresh_steps=self._psft.refresh_steps,
            warmup_steps=self._psft.warmup_steps,
            first_size=num_batches,
            group_size=self.args.gradient_accumulation_steps,
            stamp=self._psft_stamp,
            restore=self._psft_restorer(),
        )

    # ----- the window in checkpoints (psft_torch.resume) --------------------------------------
    @override
    def train(self, resume_from_checkpoint: Optional[str | bool] = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # None: the host raises
        self._psft_resume = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _psft_save_window(self, checkpoint: str) -> None:
        """Write this rank's untrained stamped micro-batches into ``checkpoint`` (objectives with an old policy)."""
        if self._psft is not None and self._psft.objective.uses_old_policy:
            saved = resume.remaining(self._psft_window, OLD_LOGP_KEY, self.state.global_step, self.args.world_size)
            resume.save(saved, checkpoint, self.args.process_index)

    def _psft_restorer(self) -> Optional[Callable[[list[list[dict]]], bool]]:
        """The ``restore`` of the first window after a resume from inside a window, else ``None``.

        Every rank decides together (one ``MIN`` collective): a sharded forward needs all ranks,
        so either all restore their saved share or all stamp.
        """
        checkpoint, self._psft_resume = self._psft_resume, None
        step, settings = self.state.global_step, self._psft
        if checkpoint is None or starts_window(step, settings.refresh_steps, settings.warmup_steps):
            return None
        rank, world = self.args.process_index, self.args.world_size
        end = step + window_length(step, self.state.max_steps, settings.refresh_steps, settings.warmup_steps) - 1

        def restore(groups: list[list[dict]]) -> bool:
            saved = resume.load(checkpoint, rank)
            problem = (
                f"{resume.window_file(checkpoint, rank)} is missing (an older psft-plugin or another trainer "
                f"saved the checkpoint)"
                if saved is None
                else resume.mismatch(saved, groups, step, world)
            )
            agreed = torch.tensor(int(problem is None), device=self.args.device)
            if _all_reduce(agreed, "MIN").item() == 1:
                resume.attach(saved, groups, OLD_LOGP_KEY)
                return True
            LOG.warning(
                "psft-plugin: %s was saved inside an old-policy window but its window cannot be restored: %s. "
                "Steps %d-%d are trained against old log-probs stamped now with the checkpoint's weights instead "
                "of those of the window's start, so the run differs from an uninterrupted one.",
                checkpoint,
                problem or "another rank's saved window does not match",
                step,
                end,
            )
            return False

        return restore

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
            if inputs.get("labels") is not None or self._psft_pending["shift_labels"] is not None:
                targets = aligned_targets(inputs.get("labels"), self._psft_pending["shift_labels"])
                entropy = model.training and not self._psft_stamping  # a training metric only
                inputs = {**inputs, **self._psft_path.forward_kwargs(targets, entropy)}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _psft_loss_func(self, outputs: Any, labels: Optional[torch.Tensor], num_items_in_batch: Any = None):
        """The host's ``compute_loss_func``: one micro-batch's share of the step's loss."""
        pending = self._psft_pending
        targets = aligned_targets(labels, pending.get("shift_labels"))
        training = pending.get("training", False) and not self._psft_stamping
        logp, entropy = self._psft_path.logprobs(outputs, targets, training)
        mask = targets != IGNORE_INDEX
        if self._psft_stamping:
            self._psft_stamped = logp.detach()
            return logp.new_zeros(())
        if not training:  # evaluation: plain NLL over this batch
            fn, kwargs = self._psft.loss(SFT)
            return fn(logp, None, mask, **kwargs)[0]
        return self._psft_train_loss(logp, entropy, mask, pending.get("old_logp"))

    def _psft_train_loss(self, logp, entropy, mask, old_logp) -> torch.Tensor:
        """Loss of one training micro-batch; closes the step's metrics after its last one."""
        step = self._psft_step
        if step is None or step.denominator is None:
            raise RuntimeError("PSFT could not count the step's response tokens: the batches carry no `labels`")
        if step.kind == STAMPED and old_logp is None:
            raise RuntimeError("PSFT: a stamped micro-batch lost its old log-probs before the loss (host bug?)")
        old = old_logp if step.kind == STAMPED else logp.detach()
        fn, kwargs = self._psft.loss(step.kind)
        loss, metrics = fn(logp, old, mask, num_tokens=step.denominator, **kwargs)
        step.metrics.add(loss, metrics, (entropy * mask).sum())
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
            logs.update(combine_steps(self._psft_records))
            self._psft_records = []
        return super().log(logs, *args, **kwargs)


class _SaveWindow(TrainerCallback):
    """Saves the trainer's window with every checkpoint, on every rank (``on_save`` runs on all of them)."""

    def __init__(self, trainer: PSFTTrainerMixin):
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._psft_save_window(f"{args.output_dir}/{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class PSFTTrainer(PSFTTrainerMixin, Trainer):
    """``transformers.Trainer`` with a registered objective: ``PSFTTrainer(..., psft_config={...})``."""
