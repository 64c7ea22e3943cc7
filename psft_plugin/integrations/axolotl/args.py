"""The plugin's YAML keys as a pydantic model, derived from the objective registry.

Axolotl merges this model into its config model, so ``loss`` and the ``psft_*`` keys are
validated with the rest of the YAML. The fields are built from the registered objectives'
:class:`psft_plugin.Option` declarations (type, bounds, help): nothing is declared twice. The
``before`` validator sees the raw YAML (Axolotl passes the whole dict before it drops unknown
keys) and hands it to the core resolver (:func:`psft_plugin.config.resolve`), which holds every
rule the hosts share (unknown objective, misspelt keys, bounds, keys the objective ignores),
together with Axolotl's own keys and what only this host checks (:func:`axolotl_problems`:
settings whose trainer or loss cannot host the objective, sequence/tensor parallel degrees,
the chunked LM head with a setting that replaces the trainer or the head).

Axolotl 0.21 loads the plugin for *every* config (entry-point group ``axolotl.plugins``), so
every field defaults to ``None`` (the trainer fills the declared defaults): a config that sets
none of our keys validates to exactly what it would without the plugin, and
:func:`claims` tells the plugin's hooks to stay out of its way.
"""

from __future__ import annotations

from typing import Any, Collection, Literal, Optional

from pydantic import BaseModel, Field, create_model, model_validator

from psft_plugin.config import KEY_PREFIX, LOSS_OPTION, resolve
from psft_plugin.objectives import LM_HEAD_CHUNK_KEY
from psft_plugin.options import ConfigError, Option
from psft_plugin.registry import default_registry

DEFAULT_LOSS = LOSS_OPTION.default

# Axolotl settings whose own loss or trainer cannot host PSFT: key -> the fix.
UNSUPPORTED = {
    "rl": "PSFT is a supervised objective; remove `rl:` (preference/RL trainers are not supported)",
    "reward_model": "reward-model training has its own loss; remove `reward_model`",
    "process_reward_model": "reward-model training has its own loss; remove `process_reward_model`",
    "orpo_alpha": "ORPO has its own loss; remove `orpo_alpha`",
    "use_eaft": "EAFT installs its own loss function; remove `use_eaft`",
    "kd_trainer": "knowledge distillation has its own trainer; remove `kd_trainer`",
    "trainer_cls": "the plugin supplies the trainer; remove `trainer_cls`",
    "cut_cross_entropy": "cut-cross-entropy returns no logits; set `cut_cross_entropy: false` and get the memory "
    "back with `psft_lm_head_chunk_size: 1024` (no [B, T, V] logits either)",
    "liger_fused_linear_cross_entropy": "Liger's fused linear CE returns no logits; set "
    "`liger_fused_linear_cross_entropy: false` (other Liger kernels are fine) "
    "and get the memory back with `psft_lm_head_chunk_size: 1024`",
    "label_smoothing_factor": "label smoothing is not part of the objective; remove `label_smoothing_factor`",
}


# Parallelism that splits a sequence or a layer across ranks: the old-policy pass and the
# per-token loss are not wired into it (and it is untested); data parallel, FSDP2 and ZeRO are.
PARALLEL_DEGREES = ("context_parallel_size", "sequence_parallel_degree", "tensor_parallel_size", "expert_parallel_size")


def unsupported_settings(config: dict) -> list[str]:
    """Keys of ``config`` set to something PSFT cannot train with (a degree in :data:`PARALLEL_DEGREES` > 1 too)."""
    found = [key for key in UNSUPPORTED if config.get(key) not in (None, False, 0, "", "none")]
    for key in PARALLEL_DEGREES:
        if (config.get(key) or 1) > 1:
            found.append(key)
    return found


def claims(config: Any) -> bool:
    """True when ``config`` asks for this plugin: it sets ``loss`` or any objective option.

    Any ``psft_*`` key counts too, so that a misspelt key is reported rather than dropped.
    """
    options = default_registry().options()
    return config.get("loss") is not None or any(
        config.get(key) is not None for key in config if key.startswith(KEY_PREFIX) or key in options
    )


def _field(option: Option) -> tuple[Any, Any]:
    """A pydantic field for ``option``: its type (a Literal for choices), bounds and help.

    The default is ``None`` (unset); the trainer resolves it to ``option.default``.
    """
    annotation = Literal[option.choices] if option.choices else option.type
    return Optional[annotation], Field(
        default=None,
        ge=option.ge,
        gt=option.gt,
        lt=option.lt,
        description=f"{option.help} (default {option.default!r})",
    )


def axolotl_problems(config: dict) -> list[str]:
    """The Axolotl settings of ``config`` that the plugin's trainer cannot host with its objective.

    Any objective but plain CE needs the plugin's trainer (:data:`UNSUPPORTED`, parallel degrees);
    the chunked LM head needs it too.
    """
    problems = []
    if (config.get("loss") or DEFAULT_LOSS) != DEFAULT_LOSS:
        problems += [
            f"`loss: {config.get('loss')}` cannot run with `{key}`: {UNSUPPORTED.get(key, f'set `{key}: 1`')}"
            for key in unsupported_settings(config)
        ]
    chunk = config.get(LM_HEAD_CHUNK_KEY)
    if isinstance(chunk, int) and chunk > 0:
        # These settings replace the plugin's trainer or the model's LM head, so the key would be ignored.
        problems += [
            f"`{LM_HEAD_CHUNK_KEY}: {chunk}` cannot be combined with `{key}`, which replaces the trainer "
            f"or the LM head that it chunks; remove one of the two"
            for key in unsupported_settings(config)
        ]
    return problems


def axolotl_keys() -> set[str]:
    """The keys (and aliases) of Axolotl's own config model, which are never taken for misspelt options."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    return model_keys(AxolotlInputConfig)


def model_keys(model: type[BaseModel]) -> set[str]:
    """Field names and their aliases of a pydantic model."""
    keys = set(model.model_fields)
    for field in model.model_fields.values():
        keys |= {alias for alias in (field.alias, field.validation_alias) if isinstance(alias, str)}
    return keys


def config_problems(config: dict, host_keys: Optional[Collection[str]] = None) -> list[str]:
    """Every problem of the raw YAML mapping ``config`` as far as the plugin is concerned.

    The core resolver's (:func:`psft_plugin.config.resolve`) plus :func:`axolotl_problems`.
    ``host_keys``: the keys Axolotl reads (default: its config model's). A config that does not
    :func:`claim <claims>` the plugin has none.
    """
    if not claims(config):
        return []
    try:
        resolve(
            config, host_keys=axolotl_keys() if host_keys is None else host_keys, host_problems=axolotl_problems(config)
        )
    except ConfigError as error:
        return error.problems
    return []


class PSFTArgsBase(BaseModel):
    """Validation shared by the generated args model (see :func:`config_problems`)."""

    @model_validator(mode="before")
    @classmethod
    def check_psft_config(cls, data: Any) -> Any:
        if isinstance(data, dict):
            problems = config_problems(data, host_keys=model_keys(cls))  # cls: Axolotl's merged config model
            if problems:
                raise ValueError(str(ConfigError(problems)))
        return data


def build_args_model() -> type[BaseModel]:
    """The pydantic model of ``loss`` plus every registered ``psft_*`` option."""
    names = default_registry().names()
    fields = {key: _field(option) for key, option in default_registry().options().items()}
    fields["loss"] = (
        Optional[str],
        Field(
            default=None,
            description=f"objective from the psft-plugin registry: {', '.join(names)} "
            "(unset, with no `psft_*` key: the config is left to Axolotl)",
        ),
    )
    return create_model("PSFTArgs", __base__=PSFTArgsBase, __module__=__name__, **fields)


PSFTArgs = build_args_model()

__all__ = ["PSFTArgs", "axolotl_problems", "claims", "config_problems", "unsupported_settings"]
