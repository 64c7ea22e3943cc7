"""The plugin's YAML keys as a pydantic model, derived from the objective registry.

Axolotl merges this model into its config model, so ``loss`` and the ``psft_*`` keys are
validated with the rest of the YAML. The fields are built from the registered objectives'
:class:`psft_plugin.Option` declarations (type, default, bounds, help): nothing is declared
twice. The ``before`` validator sees the raw YAML (Axolotl passes the whole dict before it
drops unknown keys), so it also catches typos in ``psft_*`` keys and modes PSFT cannot run in.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, create_model, model_validator

from psft_plugin.options import ConfigError, Option, unknown_keys
from psft_plugin.registry import UnknownObjectiveError, default_registry

DEFAULT_LOSS = "ce"
KEY_PREFIX = "psft_"

# Axolotl settings whose own loss or trainer cannot host PSFT: key -> the fix.
UNSUPPORTED = {
    "rl": "PSFT is a supervised objective; remove `rl:` (preference/RL trainers are not supported)",
    "reward_model": "reward-model training has its own loss; remove `reward_model`",
    "process_reward_model": "reward-model training has its own loss; remove `process_reward_model`",
    "orpo_alpha": "ORPO has its own loss; remove `orpo_alpha`",
    "use_eaft": "EAFT installs its own loss function; remove `use_eaft`",
    "kd_trainer": "knowledge distillation has its own trainer; remove `kd_trainer`",
    "trainer_cls": "the plugin supplies the trainer; remove `trainer_cls`",
    "cut_cross_entropy": "cut-cross-entropy returns no logits; set `cut_cross_entropy: false`",
    "liger_fused_linear_cross_entropy": "Liger's fused linear CE returns no logits; set "
                                        "`liger_fused_linear_cross_entropy: false` (other Liger kernels are fine)",
    "label_smoothing_factor": "label smoothing is not part of the objective; remove `label_smoothing_factor`",
}


def unsupported_settings(config: dict) -> list[str]:
    """Keys of ``config`` set to something PSFT cannot train with (``context_parallel_size`` > 1 too)."""
    found = [key for key in UNSUPPORTED if config.get(key) not in (None, False, 0, "", "none")]
    for key in ("context_parallel_size", "sequence_parallel_degree"):
        if (config.get(key) or 1) > 1:
            found.append(key)
    return found


def _field(option: Option) -> tuple[Any, Any]:
    """A pydantic field for ``option``: its type (a Literal for choices), default, bounds and help."""
    annotation = Literal[option.choices] if option.choices else option.type
    return annotation, Field(default=option.default, ge=option.ge, gt=option.gt, lt=option.lt,
                             description=option.help)


def config_problems(config: dict) -> list[str]:
    """Every problem of the raw YAML mapping ``config`` as far as the plugin is concerned."""
    registry = default_registry()
    options = registry.options()
    name = config.get("loss") or DEFAULT_LOSS
    try:
        objective = registry.get(name)
    except UnknownObjectiveError as error:
        return [str(error)]
    problems = unknown_keys(config, options, prefix=KEY_PREFIX)
    problems += [p for key, option in options.items() if config.get(key) is not None
                 for p in [option.problem(config[key])] if p]
    read = {option.key for option in objective.options}
    problems += [f"`{key}` has no effect with `loss: {name}`; set `loss: psft` or remove `{key}`"
                 for key in options if key not in read and config.get(key) is not None]
    if name != DEFAULT_LOSS:
        problems += [f"`loss: {name}` cannot run with `{key}`: {UNSUPPORTED.get(key, f'set `{key}: 1`')}"
                     for key in unsupported_settings(config)]
    return problems


class PSFTArgsBase(BaseModel):
    """Validation shared by the generated args model (see :func:`config_problems`)."""

    @model_validator(mode="before")
    @classmethod
    def check_psft_config(cls, data: Any) -> Any:
        if isinstance(data, dict):
            problems = config_problems(data)
            if problems:
                raise ValueError(str(ConfigError(problems)))
        return data


def build_args_model() -> type[BaseModel]:
    """The pydantic model of ``loss`` plus every registered ``psft_*`` option."""
    names = default_registry().names()
    fields = {key: _field(option) for key, option in default_registry().options().items()}
    fields["loss"] = (Optional[str], Field(
        default=DEFAULT_LOSS, description=f"objective from the psft-plugin registry: {', '.join(names)}"))
    return create_model("PSFTArgs", __base__=PSFTArgsBase, __module__=__name__, **fields)


PSFTArgs = build_args_model()

__all__ = ["PSFTArgs", "config_problems", "unsupported_settings"]
