"""Axolotl's trainer with the PSFT mixin in front: metrics go through ``store_metrics``."""

from __future__ import annotations

from axolotl.core.trainers.base import AxolotlTrainer
from typing_extensions import override

from psft_torch.trainer import METRIC_PREFIX, PSFTTrainerMixin

REDUCTIONS = {METRIC_PREFIX + "ratio_min": "min", METRIC_PREFIX + "ratio_max": "max"}


class AxolotlPSFTTrainer(PSFTTrainerMixin, AxolotlTrainer):
    """``AxolotlTrainer`` training the objective named by ``loss:`` (configured by the plugin)."""

    @override
    def psft_record(self, metrics: dict[str, float]) -> None:
        # Axolotl reduces stored metrics over the steps between two log lines (as KD does).
        self.store_metrics({key: (value, REDUCTIONS.get(key, "mean")) for key, value in metrics.items()},
                           train_eval="train")
