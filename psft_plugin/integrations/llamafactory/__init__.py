"""LLaMA-Factory host: ``psft-llamafactory train cfg.yaml`` trains ``loss: psft`` through LLaMA-Factory.

The YAML is the one ``llamafactory-cli train`` reads, plus ``loss:`` and the objective's keys::

    model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
    stage: sft
    finetuning_type: lora
    dataset: alpaca_en_demo
    template: qwen
    output_dir: saves/psft
    loss: psft
    psft_refresh_steps: 8

The package is thin: :mod:`.args` validates the YAML (the core resolver together with
LLaMA-Factory's own checks), :mod:`.trainer` puts :class:`psft_torch.trainer.PSFTTrainerMixin` in
front of LLaMA-Factory's ``CustomSeq2SeqTrainer``, and :mod:`.cli` runs LLaMA-Factory's own SFT
workflow with that trainer, in one process or in every ``torchrun`` rank (:mod:`.worker`). Why it
patches, and how little, is in :mod:`.cli`'s docstring and docs/llamafactory.md.
"""

from psft_plugin.integrations.llamafactory.cli import main

__all__ = ["main"]
