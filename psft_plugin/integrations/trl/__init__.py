"""TRL host: ``PSFTConfig`` and ``PSFTTrainer``, Proximal SFT inside TRL's own ``SFTTrainer``.

In TRL's style (as ``GRPOConfig`` / ``GRPOTrainer``)::

    from psft_plugin.integrations.trl import PSFTConfig, PSFTTrainer

    args = PSFTConfig(output_dir="out", loss="psft", psft_refresh_steps=8)
    PSFTTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset).train()

and on the command line, as ``trl sft``: ``psft-trl --config cfg.yaml`` (also
``python -m psft_plugin.integrations.trl`` and ``accelerate launch -m psft_plugin.integrations.trl``).

- :mod:`.config`: ``PSFTConfig``, an ``SFTConfig`` whose extra fields (``loss`` and every
  registered objective option) are derived from the registry's declarations;
- :mod:`.trainer`: ``PSFTTrainer``, an ``SFTTrainer`` with :class:`psft_torch.trainer.PSFTTrainerMixin`;
- :mod:`.cli`: the command line (``ScriptArguments`` + ``PSFTConfig`` + ``ModelConfig`` through ``TrlParser``).

The TRL lines tested are listed in :data:`TESTED_TRL`; see docs/trl.md.
"""

from __future__ import annotations

import os
import warnings
from importlib import metadata

TESTED_TRL = ("0.24", "1.14")
"""The TRL release lines (major.minor) this host is tested with."""
UNTESTED_ENV = "PSFT_TRL_ALLOW_UNTESTED"


class UnsupportedTRLError(ImportError):
    """The installed TRL is outside the tested lines (set ``PSFT_TRL_ALLOW_UNTESTED=1`` to try anyway)."""


def check_trl_version(version: str) -> None:
    """Raise :class:`UnsupportedTRLError` for a TRL ``version`` outside :data:`TESTED_TRL`.

    With ``PSFT_TRL_ALLOW_UNTESTED=1`` it warns instead: SFTTrainer's internals that the trainer
    replaces (``compute_loss``, its metrics) change between TRL lines.
    """
    if ".".join(version.split(".")[:2]) in TESTED_TRL:
        return
    tested = " or ".join(f"{line}.x" for line in TESTED_TRL)
    message = (
        f"psft-plugin's TRL host is tested with TRL {tested}, but TRL {version} is installed. Install a tested "
        f'line (pip install "trl~={TESTED_TRL[-1]}.0") or set {UNTESTED_ENV}=1 to run it untested'
    )
    if os.environ.get(UNTESTED_ENV) == "1":
        warnings.warn(message, stacklevel=2)
        return
    raise UnsupportedTRLError(message)


check_trl_version(metadata.version("trl"))

from psft_plugin.integrations.trl.config import PSFTConfig  # noqa: E402  (after the version check)
from psft_plugin.integrations.trl.trainer import PSFTTrainer  # noqa: E402

__all__ = ["PSFTConfig", "PSFTTrainer", "TESTED_TRL", "UnsupportedTRLError", "check_trl_version"]
