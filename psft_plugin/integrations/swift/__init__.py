"""ms-swift host: ``psft-swift sft <swift sft flags> --loss_type psft --psft_refresh_steps 8``.

A drop-in for ``swift sft`` (docs/swift.md). :mod:`.cli` takes the objective (``--loss_type``
naming a registered objective) and its options (flags spelt like their YAML keys, or keys of a
positional config file) out of the command line, validates them with the core resolver
(:func:`psft_plugin.config.resolve`) together with the ms-swift settings PSFT cannot train with,
and hands every other flag to ms-swift's own ``swift sft`` entry, adding ``--external_plugins``
:mod:`.plugin`. ms-swift imports that file while it parses its arguments, in every process it
starts (``NPROC_PER_NODE`` re-executes the entry under ``torchrun``) and dataloader worker; the
plugin registers the objectives in ms-swift's loss registry (``swift.loss.mapping.loss_map``) and
the trainer (:mod:`.trainer`, ms-swift's ``Seq2SeqTrainer`` with
:class:`psft_torch.trainer.PSFTTrainerMixin` in front) in its trainer registry
(``TrainerFactory.TRAINER_MAPPING``). The validated configuration travels in the environment
variable :data:`.environment.CONFIG_ENV`.
"""

from psft_plugin.integrations.swift.cli import main

__all__ = ["main"]
