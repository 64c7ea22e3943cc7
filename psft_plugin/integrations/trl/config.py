"""``PSFTConfig``: TRL's ``SFTConfig`` plus ``loss`` and every registered objective option.

The extra fields are generated from the registry's :class:`psft_plugin.Option` declarations
(type, choices, help with the default and the range), so ``TrlParser`` / ``HfArgumentParser``,
a YAML file and Python keyword arguments all know them and nothing is declared twice. Every
field defaults to ``None`` (unset, as the core resolver expects); ``__post_init__`` validates
them with :func:`psft_plugin.config.resolve` (unknown objective, bounds, options the objective
ignores) together with the TRL settings the trainer cannot train with (:func:`trl_problems`), then
fills in the resolved values, so ``args.psft_refresh_steps`` reads 8 for ``loss: psft``.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any, Literal, Optional

from trl import SFTConfig

from psft_plugin.config import LOSS_OPTION, resolve
from psft_plugin.objectives import LM_HEAD_CHUNK_KEY
from psft_plugin.options import Option
from psft_plugin.registry import default_registry

TRL_LOSS = "nll"
"""TRL's ``loss_type`` that leaves the model's logits alone; the trainer replaces its loss with the objective's."""

# TRL's own losses that PSFTTrainer replaces: loss_type value -> the fix.
LOSS_TYPE_FIXES = {
    "dft": "set `loss: dft` (psft-plugin's DFT, the same loss) and remove `loss_type`",
    "chunked_nll": f"remove `loss_type` and set `{LM_HEAD_CHUNK_KEY}: 256` (the same memory saving: "
    "the LM head in chunks, no [B, T, V] logits, for every objective)",
}
LIGER_FIX = (
    f"Liger's fused linear cross-entropy returns no logits; set `use_liger_kernel: false` and get the memory "
    f"back with `{LM_HEAD_CHUNK_KEY}: 1024` (no [B, T, V] logits either)"
)
PARSER_TYPES = {dict: dict, object: str}
"""Command-line type of an option whose YAML value may be a mapping or anything (argparse needs a callable)."""


def trl_problems(config: Any) -> list[str]:
    """The TRL settings of ``config`` (an ``SFTConfig``) that replace or hide the logits the objective needs."""
    loss = config.loss or LOSS_OPTION.default
    problems = []
    if config.loss_type not in (None, TRL_LOSS):
        fix = LOSS_TYPE_FIXES.get(config.loss_type, "remove `loss_type`; `loss` names the objective")
        problems.append(f"`loss_type: {config.loss_type}` is TRL's own loss and cannot run with `loss: {loss}`: {fix}")
    if config.use_liger_kernel:
        problems.append(f"`use_liger_kernel: true` cannot run with `loss: {loss}`: {LIGER_FIX}")
    return problems


def _field(option: Option) -> tuple[str, Any, Any]:
    """A dataclass field for ``option``: ``None`` by default, its type (a Literal for choices) and help."""
    annotation = Literal[option.choices] if option.choices else PARSER_TYPES.get(option.type, option.type)
    help_text = f"{option.help} (default {option.default!r}; range {option.bounds_text()})"
    return option.key, Optional[annotation], field(default=None, metadata={"help": help_text})


def _loss_field() -> tuple[str, Any, Any]:
    names = ", ".join(default_registry().names())
    help_text = f"{LOSS_OPTION.help}; registered: {names} (default {LOSS_OPTION.default!r})"
    return LOSS_OPTION.key, Optional[str], field(default=None, metadata={"help": help_text})


class _PSFTConfigBase(SFTConfig):
    """Validation and the trainer's view of the generated fields (see :class:`PSFTConfig`)."""

    def __post_init__(self) -> None:
        problems = trl_problems(self)
        if self.loss_type is None:  # TRL >= 1.x would pick its logits-free `chunked_nll`
            self.loss_type = TRL_LOSS
        settings = resolve(self.psft_config(), closed=True, host_problems=problems)
        self.loss = settings.objective.name
        for key, value in {**settings.resolved, **settings.trainer}.items():
            setattr(self, key, value)
        super().__post_init__()

    def psft_config(self) -> dict[str, Any]:
        """``{"loss": ..., "psft_*": ...}`` of the set fields, for ``PSFTTrainerMixin.configure_psft``."""
        keys = [LOSS_OPTION.key, *default_registry().options()]
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


PSFTConfig = make_dataclass(
    "PSFTConfig",
    [_loss_field(), *(_field(option) for option in default_registry().options().values())],
    bases=(_PSFTConfigBase,),
    namespace={
        "__module__": __name__,
        "__doc__": "TRL's ``SFTConfig`` plus ``loss`` (the objective) and every registered objective "
        "option (``psft_refresh_steps``, ...), validated by psft-plugin's configuration resolver.",
    },
)
