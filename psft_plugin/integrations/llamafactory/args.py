"""The YAML of ``psft-llamafactory train``: LLaMA-Factory's keys plus ``loss`` and the objective's.

One check, before anything loads or is written: the core resolver
(:func:`psft_plugin.config.resolve`) sees the whole YAML as a *closed* mapping, since LLaMA-Factory's
argument parser accepts no key it does not know, so every unknown key is reported with the
closest key of either side (``lora_rnak`` -> ``lora_rank``, ``psft_refresh_step`` ->
``psft_refresh_steps``). Handed in as the host's problems: LLaMA-Factory's own checks of its keys
(its argument parser, and in the training process its ``get_train_args``), and the settings the
PSFT trainer cannot run with (:data:`UNSUPPORTED`, :data:`UNSUPPORTED_ENV`, ``stage``).

A YAML that sets neither ``loss`` nor an objective option is LLaMA-Factory's own run: it trains
with LLaMA-Factory's trainer, untouched (:func:`claims`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from psft_plugin.config import KEY_PREFIX, LOSS_OPTION, Settings, resolve
from psft_plugin.registry import default_registry

# LLaMA-Factory settings that the PSFT trainer cannot host: key -> the fix.
UNSUPPORTED = {
    "use_dft_loss": "`use_dft_loss` and `loss:` both choose the loss; remove `use_dft_loss` "
    "(`loss: dft` is the same objective) or remove `loss:`",
    "use_asft_loss": "`use_asft_loss` and `loss:` both choose the loss; remove one of them",
    "use_eaft_loss": "`use_eaft_loss` and `loss:` both choose the loss; remove one of them",
    "enable_liger_kernel": "LLaMA-Factory then applies Liger's fused linear cross-entropy, whose model returns "
    "no logits; set `enable_liger_kernel: false` and get the memory back with `psft_lm_head_chunk_size: 1024` "
    "(no [B, T, V] logits either)",
    "use_hyper_parallel": "HyperParallel trains with its own workflow, not LLaMA-Factory's SFT trainer; "
    "remove `use_hyper_parallel` (data parallel and DeepSpeed ZeRO-2/3 are supported)",
}
# Environment variables that move training where the PSFT trainer is not: variable -> the fix.
UNSUPPORTED_ENV = {
    "USE_RAY": "Ray workers import LLaMA-Factory afresh, without the PSFT trainer; unset USE_RAY "
    "(FORCE_TORCHRUN=1 NPROC_PER_NODE=N runs N processes)",
    "USE_MCA": "Megatron (MCA) training has its own workflow; unset USE_MCA",
    "USE_V1": "LLaMA-Factory's v1 trainer is not hosted; unset USE_V1",
}
STAGE = "sft"


@dataclass(frozen=True)
class Plan:
    """A validated ``psft-llamafactory train`` run.

    Attributes:
        host: the YAML without our keys, as ``llamafactory-cli train`` would read it.
        settings: the objective's settings, or ``None`` for LLaMA-Factory's own run (see :func:`claims`).
        trainer_config: ``{"loss": ..., "psft_*": ...}`` for ``PSFTTrainerMixin.configure_psft``.
    """

    host: dict[str, Any]
    settings: Optional[Settings]
    trainer_config: dict[str, Any]


def our_keys(config: Mapping[str, Any]) -> list[str]:
    """The keys of ``config`` that are ours: ``loss``, every registered option and any ``psft_*`` key."""
    options = default_registry().options()
    return [key for key in config if key == LOSS_OPTION.key or key in options or str(key).startswith(KEY_PREFIX)]


def claims(config: Mapping[str, Any]) -> bool:
    """True when ``config`` asks for psft-plugin's trainer: it sets ``loss`` or any of our keys."""
    return any(config.get(key) is not None for key in our_keys(config))


def llamafactory_keys() -> set[str]:
    """Every key LLaMA-Factory's training argument parser accepts (its dataclasses' init fields)."""
    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )

    classes = (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments)
    return {field.name for cls in classes for field in dataclasses.fields(cls) if field.init}


def llamafactory_problems(host: Mapping[str, Any], launching: bool) -> list[str]:
    """LLaMA-Factory's own verdict on its keys of ``host`` (unknown keys are the resolver's).

    ``launching``: this process only starts the workers, so only the argument parser runs (its
    full check, ``get_train_args``, refuses DeepSpeed outside the workers); the process that trains
    runs ``get_train_args`` itself, which loads nothing (LLaMA-Factory runs it again in ``run_exp``).
    Its checks raise ``ValueError`` (settings), ``TypeError`` (values) or ``ImportError`` (a
    package a setting needs).
    """
    from llamafactory.hparams import get_train_args
    from llamafactory.hparams.parser import _TRAIN_ARGS
    from transformers import HfArgumentParser

    known = llamafactory_keys()
    args = {key: value for key, value in host.items() if key in known}
    try:
        if launching:
            HfArgumentParser(_TRAIN_ARGS).parse_dict(args)
        else:
            get_train_args(args)
    except (ValueError, TypeError, ImportError) as error:
        return [f"LLaMA-Factory: {error}"]
    return []


def unsupported_problems(config: Mapping[str, Any]) -> list[str]:
    """The settings of ``config`` (and the environment) the PSFT trainer cannot run with."""
    loss = f"`loss: {config.get(LOSS_OPTION.key) or LOSS_OPTION.default}`"
    problems = [f"{loss} cannot run with `{key}: true`: {fix}" for key, fix in UNSUPPORTED.items() if config.get(key)]
    stage = config.get("stage", STAGE)
    if stage != STAGE:
        problems.append(
            f"{loss} cannot run with `stage: {stage}`: psft-plugin trains the supervised stage; set "
            f"`stage: {STAGE}` or use `llamafactory-cli train` without `loss:`"
        )
    problems += [
        f"{loss} cannot run with the environment variable {name}={os.environ[name]}: {fix}"
        for name, fix in UNSUPPORTED_ENV.items()
        if os.environ.get(name, "0").lower() in ("true", "y", "1")
    ]
    return problems


def plan(config: Mapping[str, Any], launching: bool = False) -> Plan:
    """Validate the whole YAML ``config``; raises :class:`~psft_plugin.options.ConfigError` listing every problem.

    ``launching``: see :func:`llamafactory_problems`.
    """
    ours = set(our_keys(config))
    host = {key: value for key, value in config.items() if key not in ours}
    claimed = claims(config)
    refused = unsupported_problems(config) if claimed else []
    # A refused setting is left out of LLaMA-Factory's check, whose complaint (e.g. a missing
    # liger-kernel) would only blur the fix we give.
    checked = {key: value for key, value in host.items() if not (claimed and key in UNSUPPORTED)}
    problems = llamafactory_problems(checked, launching) + refused
    settings = resolve(config, host_keys=llamafactory_keys(), closed=True, host_problems=problems)
    values = {key: config[key] for key in ours if key != LOSS_OPTION.key and config.get(key) is not None}
    trainer_config = {LOSS_OPTION.key: settings.objective.name, **values}
    return Plan(host=host, settings=settings if claimed else None, trainer_config=trainer_config)
