"""The validated configuration's way from ``psft-swift`` to ms-swift's processes: one environment variable.

``torchrun``'s ranks and dataloader workers inherit it; ms-swift's own flags cannot carry our keys
(its parser stops at an unknown flag).
"""

from __future__ import annotations

import json
import os
from typing import Any

CONFIG_ENV = "PSFT_SWIFT_CONFIG"


def config_from_environment() -> dict[str, Any]:
    """``{"loss": ..., "psft_*": ...}`` as validated by ``psft-swift``; an error naming the entry point without it."""
    raw = os.environ.get(CONFIG_ENV)
    if raw is None:
        raise RuntimeError(
            f"the psft-plugin ms-swift plugin was loaded without {CONFIG_ENV}: start the run with "
            f"`psft-swift sft ...` (it validates the options and sets it), not `swift sft --external_plugins`"
        )
    return json.loads(raw)
