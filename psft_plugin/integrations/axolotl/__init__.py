"""Axolotl plugin: ``loss: psft`` trains Proximal SFT through ``axolotl train``.

Axolotl 0.21 loads it for every config through the ``axolotl.plugins`` entry point, so
``loss: psft`` alone is enough there, and the hooks leave configs that do not :func:`claim
<psft_plugin.integrations.axolotl.args.claims>` the plugin to Axolotl untouched. Axolotl 0.19
imports only listed plugins and drops unknown keys, so there both lines are needed (``loss: psft``
alone would silently train plain cross-entropy)::

    plugins:
      - psft_plugin.integrations.axolotl.PSFTPlugin
    loss: psft

The plugin is thin: the YAML keys come from :mod:`.args` (derived from the objective registry),
the training logic from :class:`psft_torch.trainer.PSFTTrainerMixin`. With the plugin listed,
``loss: ce`` also runs through the mixin, so CE and PSFT share the global token-mean over the
optimizer step (Axolotl's own trainer averages per-micro-batch means instead); configurations
the mixin cannot host (RL, reward models, ORPO, EAFT, ...) keep Axolotl's own trainer for CE
and are rejected for any other objective.
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from psft_plugin.integrations.axolotl.args import DEFAULT_LOSS, claims, unsupported_settings
from psft_plugin.options import ConfigError
from psft_plugin.registry import default_registry

LOG = get_logger("axolotl.integrations.psft")
ARGS_MODEL = "psft_plugin.integrations.axolotl.args.PSFTArgs"


def trainer_config(cfg: Any) -> dict[str, Any]:
    """``{"loss": ..., "psft_*": ...}`` from a validated Axolotl config, for ``configure_psft``."""
    values = {key: cfg.get(key) for key in default_registry().options() if cfg.get(key) is not None}
    return {"loss": cfg.get("loss") or DEFAULT_LOSS, **values}


def use_cpu_for_data_parallel_ranks(cfg: Any) -> None:
    """Place each rank on the CPU when data parallel runs without an accelerator (gloo).

    Axolotl 0.19 sets ``device_map = {"": LOCAL_RANK}`` for every multi-process run, which
    transformers reads as accelerator ``LOCAL_RANK`` and fails to load the model on a CPU-only
    machine. Only that case is changed; GPU runs keep Axolotl's map.
    """
    device_map = cfg.get("device_map")
    if (
        cfg.get("device") == "cpu"
        and isinstance(device_map, dict)
        and list(device_map) == [""]
        and isinstance(device_map[""], int)
    ):
        LOG.info("psft-plugin: CPU data parallel: loading each rank's model on the CPU (device_map=cpu)")
        cfg.device_map = "cpu"


class PSFTPlugin(BasePlugin):
    """Adds ``loss`` and the ``psft_*`` keys, and the trainer that trains them."""

    def get_input_args(self) -> str:
        return ARGS_MODEL

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> None:
        """Lets Axolotl load the data (returns ``None``); first fixes CPU data parallel's device map.

        This is the only hook between Axolotl's config normalisation and model loading.
        """
        if claims(cfg):
            use_cpu_for_data_parallel_ranks(cfg)
        return None

    def get_trainer_cls(self, cfg: Any):
        """The PSFT trainer for supervised configs that claim the plugin; ``None`` (Axolotl decides) otherwise."""
        if not claims(cfg) or cfg.get("rl") or cfg.get("reward_model") or cfg.get("process_reward_model"):
            return None
        if (cfg.get("loss") or DEFAULT_LOSS) == DEFAULT_LOSS and unsupported_settings(cfg):
            return None  # plain CE in a mode we do not host: Axolotl's trainer, unchanged
        from psft_plugin.integrations.axolotl.trainer import AxolotlPSFTTrainer

        return AxolotlPSFTTrainer

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        from psft_plugin.integrations.axolotl.trainer import AxolotlPSFTTrainer

        if not isinstance(trainer, AxolotlPSFTTrainer):
            if claims(cfg) and (cfg.get("loss") or DEFAULT_LOSS) != DEFAULT_LOSS:
                # Another plugin's trainer won (Axolotl takes the first non-None): never train CE silently.
                raise ConfigError(
                    [
                        f"`loss: {cfg.get('loss')}` needs the psft-plugin trainer, but Axolotl built "
                        f"{type(trainer).__name__} (chosen by another plugin or setting); remove "
                        f"the other trainer's plugin or setting"
                    ]
                )
            return
        settings = trainer.configure_psft(trainer_config(cfg))
        LOG.info("psft-plugin: training %s; log-probs: %s", settings.summary(), trainer.psft_logprob_path.name)
