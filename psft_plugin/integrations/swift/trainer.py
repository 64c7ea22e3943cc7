"""ms-swift's ``Seq2SeqTrainer`` with :class:`psft_torch.trainer.PSFTTrainerMixin` in front.

ms-swift builds the loss named by ``--loss_type`` from its loss registry and calls it from its
own ``compute_loss`` as ``loss(outputs, labels, num_items_in_batch=..., loss_scale=..., trainer=...)``;
:class:`SwiftObjectiveLoss` is that registry entry and hands the call to the mixin, which owns
the old-policy window (``get_batch_samples``), the step's token count and the metrics. ms-swift's
``compute_loss`` multiplies the loss by the process count under ``average_tokens_across_devices``
and transformers skips its division by the accumulation steps, as the mixin expects.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from swift.loss.base import BaseLoss
from swift.trainers import Seq2SeqTrainer
from swift.utils import get_logger
from typing_extensions import override

from psft_plugin.integrations.swift.environment import config_from_environment
from psft_torch.trainer import PSFTTrainerMixin

LOG = get_logger()


class SwiftObjectiveLoss(BaseLoss):
    """The ``loss_map`` entry of every registered objective: one micro-batch's share of the step's loss."""

    def __call__(self, outputs: Any, labels: Any, *, num_items_in_batch: Any = None, loss_scale: Any = None, **kwargs):
        if loss_scale is not None:
            raise RuntimeError(
                f"`--loss_type {self.args.loss_type}` weighs every response token alike, but the template "
                f"produced per-token `loss_scale` weights: use `--loss_scale default`"
            )
        if not isinstance(self.trainer, SwiftPSFTTrainer):
            raise RuntimeError(
                f"`--loss_type {self.args.loss_type}` needs the psft-plugin trainer, but ms-swift built "
                f"{type(self.trainer).__name__}: start the run with `psft-swift sft ...`"
            )
        return self.trainer._psft_loss_func(outputs, labels, num_items_in_batch)


class SwiftPSFTTrainer(PSFTTrainerMixin, Seq2SeqTrainer):
    """``swift sft``'s trainer training the objective ``psft-swift`` validated (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        swift_loss = self.compute_loss_func
        if not isinstance(swift_loss, SwiftObjectiveLoss):
            raise RuntimeError(
                f"the psft-plugin trainer runs registered objectives only, but `--loss_type "
                f"{self.args.loss_type}` built {type(swift_loss).__name__}: start the run with `psft-swift sft ...`"
            )
        # configure_psft installs the mixin's loss as compute_loss_func (refusing any other one);
        # ms-swift then calls it through its registry entry, which also takes ms-swift's keywords.
        self.compute_loss_func = None
        settings = self.configure_psft(config_from_environment())
        self.compute_loss_func = swift_loss
        LOG.info(f"psft-plugin: training {settings.summary()}; log-probs: {self.psft_logprob_path.name}")

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The old-policy pass runs outside training_step, which holds the template's forward context.
        context = self.template.forward_context(self.model, inputs) if self.psft_stamping else nullcontext()
        with context:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @override
    def _compute_acc(self, *args: Any, **kwargs: Any) -> None:
        if not self.psft_stamping:  # the old-policy pass is no training step: no token accuracy for it
            super()._compute_acc(*args, **kwargs)
