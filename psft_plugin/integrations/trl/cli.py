"""``psft-trl --config cfg.yaml``: TRL's ``trl sft`` with ``PSFTConfig`` and ``PSFTTrainer``.

The same dataclasses through ``TrlParser`` as ``trl sft`` (``ScriptArguments``, the training
config, ``ModelConfig``, ``DatasetMixtureConfig``), the training config being :class:`PSFTConfig`,
so a ``trl sft`` YAML plus ``loss: psft`` is a PSFT run and every flag of ``trl sft`` works;
LoRA through ``ModelConfig`` (``use_peft: true``, ``lora_r``, ...). Runs under
``accelerate launch -m psft_plugin.integrations.trl`` (or ``torchrun``) for data parallel and FSDP.

A configuration error (unknown or misspelt ``psft_*`` key, unknown ``loss``, a bound, a TRL
setting that hides the logits) is printed as a list, every problem with its fix, before anything
is loaded or written, and the exit status is 2.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import yaml

from psft_plugin.config import resolve
from psft_plugin.integrations.trl.config import PSFTConfig
from psft_plugin.integrations.trl.trainer import PSFTTrainer
from psft_plugin.options import ConfigError

PROG = "psft-trl"


def make_parser() -> Any:
    """``TrlParser`` over ``trl sft``'s dataclasses, with :class:`PSFTConfig` as the training config."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    return TrlParser((ScriptArguments, PSFTConfig, ModelConfig, DatasetMixtureConfig), prog=PROG)


def given_keys(argv: Sequence[str]) -> list[str]:
    """The keys ``argv`` sets: the ``--config`` YAML's top-level keys and the ``--flag`` names."""
    argv = list(argv)
    keys = []
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        with open(argv[argv.index("--config") + 1]) as handle:
            config = yaml.safe_load(handle)
        if isinstance(config, dict):
            keys += [str(key) for key in config if key != "env"]
    keys += [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--") and arg != "--config"]
    return keys


def check_keys(parser: Any, argv: Sequence[str]) -> None:
    """Misspelt or unknown objective keys in the YAML or the flags, as :func:`psft_plugin.config.resolve` sees them.

    ``trl sft`` ignores unknown YAML keys; a ``psft_*`` key, or one closer to an objective option
    than to any TRL key, is reported instead (it would silently leave the option at its default).
    Values are checked when ``PSFTConfig`` is built.
    """
    known = {action.dest for action in parser._actions}
    resolve({key: None for key in given_keys(argv) if key not in known}, host_keys=known)


def load_dataset_splits(script_args: Any, dataset_args: Any) -> Any:
    """The datasets as ``trl sft`` loads them: the mixture (``datasets:``) or ``dataset_name``."""
    from datasets import load_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        return get_dataset(dataset_args)
    if script_args.dataset_name:
        return load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    raise ConfigError(["set `dataset_name` (or a `datasets:` mixture): there is no training data"])


def model_init_kwargs(training_args: Any, model_args: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments from ``ModelConfig`` (as ``trl sft``), quantization included."""
    from trl import get_quantization_config

    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=bool(
            getattr(training_args, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False)
        ),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return {**kwargs, **(training_args.model_init_kwargs or {})}


def train(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any) -> PSFTTrainer:
    """Build the trainer as ``trl sft`` does, train, save (and push when asked)."""
    from transformers import set_seed
    from trl import get_peft_config

    if not model_args.model_name_or_path:
        raise ConfigError(["set `model_name_or_path`: the model to fine-tune"])
    dataset = load_dataset_splits(script_args, dataset_args)
    training_args.model_init_kwargs = model_init_kwargs(training_args, model_args)
    # SFTTrainer loads the model and adds the adapter before transformers.Trainer seeds the run:
    # seeded here, a LoRA adapter starts the same in every run (and on every rank).
    set_seed(training_args.seed)
    trainer = PSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"psft-trl: loss={training_args.loss}, model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, validate, train. Returns the exit status (0, or 2 for a configuration error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    try:
        check_keys(parser, argv)
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
            argv, fail_with_unknown_args=False
        )
        train(script_args, training_args, model_args, dataset_args)
    except ConfigError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    return 0
