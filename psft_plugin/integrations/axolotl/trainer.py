"""Axolotl's trainer with the PSFT mixin in front: metrics go through ``store_metrics``."""

from __future__ import annotations

from axolotl.core.trainers.base import AxolotlTrainer
from typing_extensions import override

from psft_plugin.metrics import PREFIX, step_reduction
from psft_torch.trainer import PSFTTrainerMixin


class AxolotlPSFTTrainer(PSFTTrainerMixin, AxolotlTrainer):
    """``AxolotlTrainer`` training the objective named by ``loss:`` (configured by the plugin)."""

    @override
    def psft_record(self, metrics: dict[str, float]) -> None:
        # Axolotl reduces stored metrics over the steps between two log lines (as KD does), with
        # the same per-name reductions as the mixin's own log (psft_plugin.metrics).
        self.store_metrics(
            {key: (value, step_reduction(key.removeprefix(PREFIX))) for key, value in metrics.items()},
            train_eval="train",
        )
