"""The file ``psft-swift`` passes to ``swift sft --external_plugins``; ms-swift imports it in every process.

Importing it registers, through ms-swift's own registries:

- every registered objective (``psft``, ``dft``, ``ce``, third-party) in ``swift.loss.mapping.loss_map``,
  so ``--loss_type psft`` names a loss ms-swift knows;
- :class:`~psft_plugin.integrations.swift.trainer.SwiftPSFTTrainer` as the trainer of the
  ``causal_lm`` task in ``TrainerFactory.TRAINER_MAPPING``: the old-policy window lives in the
  trainer's ``get_batch_samples``, which no loss or callback reaches.

The objective's options reach the trainer in an environment variable
(:mod:`psft_plugin.integrations.swift.environment`), set by :mod:`psft_plugin.integrations.swift.cli`
after validation.
"""

from __future__ import annotations

TRAINER = "psft_plugin.integrations.swift.trainer.SwiftPSFTTrainer"


def register() -> None:
    """Add the objectives to ms-swift's loss registry and the PSFT trainer to its trainer registry."""
    from swift.loss.mapping import loss_map
    from swift.trainers import TrainerFactory

    from psft_plugin.integrations.swift.trainer import SwiftObjectiveLoss
    from psft_plugin.registry import default_registry

    for name in default_registry().names():
        loss_map.setdefault(name, SwiftObjectiveLoss)
    TrainerFactory.TRAINER_MAPPING["causal_lm"] = TRAINER


register()
