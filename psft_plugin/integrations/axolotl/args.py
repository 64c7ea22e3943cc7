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
:func:`claims` tells the plugin's hooks to stay out of its way. ``PSFTArgs`` is built when Axolotl
first imports it (module ``__getattr__``), not when this module is imported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Collection, Literal, Optional

from pydantic import BaseModel, Field, create_model, model_validator

from psft_plugin.config import KEY_PREFIX, LOSS_OPTION, resolve
from psft_plugin.objectives import LM_HEAD_CHUNK_KEY
from psft_plugin.options import ConfigError, Option
from psft_plugin.registry import default_registry

DEFAULT_LOSS = LOSS_OPTION.default


@dataclass(frozen=True)
class Conflict:
    """Axolotl settings that the plugin's trainer cannot host: they bring their own loss or trainer.

    ``keys`` count as set when truthy (``degree``: when above 1). ``why`` is the reason and ``fix``
    the remedy (``{key}``: the key found), in the error and in the docs' table (:func:`conflicts_table`).
    """

    keys: tuple[str, ...]
    why: str
    fix: str
    degree: bool = False

    def found(self, config: Any) -> list[str]:
        """The keys of this conflict that ``config`` sets."""
        if self.degree:
            return [key for key in self.keys if (config.get(key) or 1) > 1]
        return [key for key in self.keys if config.get(key) not in (None, False, 0, "", "none")]


_CHUNKED_HEAD = f"get the memory back with `{LM_HEAD_CHUNK_KEY}: 1024` (no [B, T, V] logits either)"
CONFLICTS = (
    Conflict(
        ("rl",), "preference and RL training (DPO, ORPO, KTO, GRPO, ...) has its own trainer and loss", "remove `rl:`"
    ),
    Conflict(("reward_model", "process_reward_model"), "reward-model training has its own loss", "remove `{key}`"),
    Conflict(("orpo_alpha",), "ORPO adds its own odds-ratio loss", "remove `orpo_alpha`"),
    Conflict(("kd_trainer",), "knowledge distillation has its own trainer and loss", "remove `kd_trainer`"),
    Conflict(("diffusion_lm", "diffusion"), "diffusion LM training has its own trainer and loss", "remove `{key}`"),
    Conflict(("trainer_cls",), "it replaces the plugin's trainer", "remove `trainer_cls`"),
    Conflict(
        ("use_dft",),
        "Axolotl's DFT installs its own loss function",
        "remove `use_dft`; `loss: dft` trains the same objective through the plugin",
    ),
    Conflict(("use_eaft",), "EAFT installs its own loss function", "remove `use_eaft`"),
    Conflict(
        ("label_smoothing_factor",), "label smoothing is not part of the objective", "remove `label_smoothing_factor`"
    ),
    Conflict(
        ("chunked_cross_entropy",),
        "it replaces the model's cross-entropy, which the plugin does not use (it computes per-token log-probs)",
        f"remove `chunked_cross_entropy` and {_CHUNKED_HEAD}",
    ),
    Conflict(
        ("cut_cross_entropy", "liger_fused_linear_cross_entropy"),
        "these kernels return no logits (other Liger kernels are fine)",
        f"set `{{key}}: false` and {_CHUNKED_HEAD}",
    ),
    Conflict(
        ("context_parallel_size", "sequence_parallel_degree", "tensor_parallel_size", "expert_parallel_size"),
        "above 1 they split a sequence or a layer across ranks, where the old-policy pass is not wired in "
        "(data parallel, FSDP2 and ZeRO are)",
        "set `{key}: 1`",
        degree=True,
    ),
)
"""Every Axolotl setting a non-CE objective refuses; under ``loss: ce`` they keep Axolotl's own trainer."""


def unsupported_settings(config: Any) -> list[str]:
    """The keys of ``config`` that set one of the :data:`CONFLICTS`."""
    return [key for conflict in CONFLICTS for key in conflict.found(config)]


def conflicts_table() -> str:
    """docs/axolotl.md's table of the settings refused with a non-CE objective, from :data:`CONFLICTS`."""
    rows = ["| setting | why | fix |", "|---|---|---|"]
    for conflict in CONFLICTS:
        keys = ", ".join(f"`{key}`" + (" > 1" if conflict.degree else "") for key in conflict.keys)
        fix = conflict.fix.format(key=conflict.keys[0] if len(conflict.keys) == 1 else "<key>")
        rows.append(f"| {keys} | {conflict.why} | {fix} |")
    return "\n".join(rows)


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

    Any objective but plain CE needs the plugin's trainer (:data:`CONFLICTS`); the chunked LM head
    needs it too.
    """
    problems = []
    if (config.get("loss") or DEFAULT_LOSS) != DEFAULT_LOSS:
        problems += [
            f"`loss: {config.get('loss')}` cannot run with `{key}`: {conflict.why}; {conflict.fix.format(key=key)}"
            for conflict in CONFLICTS
            for key in conflict.found(config)
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


def __getattr__(name: str) -> Any:
    """``PSFTArgs`` is built on first use, when Axolotl imports it for a config, not when this module
    is imported: building it loads the objective registry, and with it every installed entry point."""
    if name == "PSFTArgs":
        return _args_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _args_model() -> type[BaseModel]:
    return build_args_model()


__all__ = [  # noqa: F822 (PSFTArgs comes from the module's __getattr__)
    "CONFLICTS",
    "PSFTArgs",
    "axolotl_problems",
    "claims",
    "config_problems",
    "conflicts_table",
    "unsupported_settings",
]
