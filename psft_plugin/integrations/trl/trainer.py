"""``PSFTTrainer``: TRL's ``SFTTrainer`` training the objective named by ``PSFTConfig.loss``.

``PSFTTrainer(PSFTTrainerMixin, _SFTHost)``: the mixin (:mod:`psft_torch.trainer`) serves the
optimizer steps from the old-policy window and installs the objective as the loss; ``_SFTHost``
is ``SFTTrainer`` with one method replaced, ``compute_loss``. Why no hook served: TRL's own
``compute_loss`` reads the logits after the loss for its metrics (and, with its default
``loss_type="chunked_nll"`` in TRL 1.x, ``outputs.num_valid_tokens``, which only TRL's patched
forward returns), so with the chunked LM head or during the old-policy pass (an eval-mode forward
that TRL would log as evaluation) it fails or logs wrong numbers. ``_SFTHost.compute_loss`` does
what TRL's does around the loss (``use_cache=False``, drops ``_prediction_loss_only``), calls
``transformers.Trainer.compute_loss`` (which calls the objective) and records TRL's own metrics,
``entropy``, ``mean_token_accuracy`` and ``num_tokens``, as TRL 1.14 defines them (entropy and
accuracy over the response tokens, gathered across ranks), skipping the old-policy pass.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from transformers import Trainer
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import entropy_from_logits
from typing_extensions import override

from psft_plugin.integrations.trl.config import PSFTConfig
from psft_plugin.options import ConfigError
from psft_plugin.spec import IGNORE_INDEX
from psft_torch.lm_head import ENTROPY_KEY
from psft_torch.trainer import PSFTTrainerMixin, aligned_targets

LOG = logging.get_logger(__name__)


class _SFTHost(SFTTrainer):
    """``SFTTrainer`` whose ``compute_loss`` leaves the loss to ``compute_loss_func`` (see the module doc)."""

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop("_prediction_loss_only", None)  # TRL >= 1.x's prediction_step marker, not a model input
        inputs["use_cache"] = False
        labels = inputs.get("labels")  # Trainer.compute_loss pops it when a compute_loss_func is set
        loss, outputs = Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if not getattr(self, "psft_stamping", False):
            self._record_trl_metrics(inputs, labels, outputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record_trl_metrics(self, inputs: Mapping[str, Any], labels: Optional[torch.Tensor], outputs: Any) -> None:
        """TRL's ``entropy`` (nats), ``mean_token_accuracy`` and ``num_tokens`` for one micro-batch.

        From the ``[B, T, V]`` logits, or from the chunked LM head's ``[B, T]`` entropy (training
        only; no accuracy there: the argmax needs the full logits).
        """
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        if labels is not None:
            targets = aligned_targets(labels)
            mask = targets != IGNORE_INDEX
            logits = outputs.get("logits")
            tokens = gather(mask.sum()).sum()
            if logits is not None and logits.dim() == 3:
                entropy = entropy_from_logits(logits)
                correct = gather(((logits.argmax(dim=-1) == targets) & mask).sum()).sum()
                self._metrics[mode]["mean_token_accuracy"].append((correct / tokens).item() if tokens > 0 else 0.0)
            else:
                entropy = outputs.get(ENTROPY_KEY)
            if entropy is not None:
                entropy_sum = gather((entropy.float() * mask).sum()).sum()
                self._metrics[mode]["entropy"].append((entropy_sum / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += _input_tokens(inputs, gather) // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def _input_tokens(inputs: Mapping[str, Any], gather: Any) -> int:
    """Input tokens of a micro-batch over all ranks, as TRL counts them (padding-free: the packed length)."""
    if "attention_mask" in inputs:
        return int(gather(inputs["attention_mask"].sum()).sum().item())
    if "position_ids" in inputs:
        length = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        return int(gather(length).sum().item())
    raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")


class PSFTTrainer(PSFTTrainerMixin, _SFTHost):
    """TRL's ``SFTTrainer`` training ``args.loss`` (``psft``, ``ce``, ``dft`` or a registered objective).

    Takes exactly ``SFTTrainer``'s arguments; ``args`` is a :class:`PSFTConfig` (default:
    ``PSFTConfig("<model>-PSFT")``, which trains plain cross-entropy).
    """

    def __init__(self, model: Any, args: Optional[SFTConfig] = None, *rest: Any, **kwargs: Any):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = PSFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-PSFT")
        elif not isinstance(args, PSFTConfig):
            raise ConfigError(
                [
                    f"PSFTTrainer needs a PSFTConfig, got {type(args).__name__}: build it with "
                    f"PSFTConfig(**your_config.to_dict(), loss=...) (an SFTConfig plus `loss` and the psft_* fields)"
                ]
            )
        super().__init__(model, args, *rest, psft_config=args.psft_config(), **kwargs)
        LOG.info(f"psft-plugin: training {self._psft.summary()}; log-probs: {self.psft_logprob_path.name}")

    @override
    def _psft_host_problems(self, config: Mapping[str, Any]) -> list[str]:
        name = config.get("loss")
        problems = super()._psft_host_problems(config)
        if getattr(self, "num_virtual_tokens", 0):
            problems.append(
                f"`loss: {name}` cannot run with prompt-learning PEFT (virtual tokens shift the logits "
                f"against the labels); use LoRA (`use_peft: true`) or another adapter that adds no tokens"
            )
        if getattr(self, "aux_loss_enabled", False):
            problems.append(
                f"`loss: {name}` does not add the mixture-of-experts router loss; set `router_aux_loss_coef: 0`"
            )
        return problems
