"""``python -m psft_plugin.mlx_train --config X.yaml [--model PATH] [--iters N] ...``

The MLX host: fine-tunes an mlx-lm model with the objective named by ``loss`` (``psft``, ``ce``
or any registered one); see docs/mlx.md. It holds what ``mlx_lm.lora`` does around the loop,
next to the Axolotl plugin in :mod:`psft_plugin.integrations`:

- :mod:`.config`: the YAML and the command-line flags, each key declared once, validated
  through the core resolver (:func:`psft_plugin.config.resolve`);
- :mod:`.checks`: the nested mappings and the data files mlx-lm reads without checking;
- :mod:`.run`: model loading, optimizer, resume, saving, callbacks and reporting;
- :mod:`.console`: the training console, on ``mlx_lm.cli_ui``.

The backend :mod:`psft_mlx` (log-probs, losses, batching, the loop) imports none of this.
Configuration errors are printed as a list (every problem, with its fix) and exit with status 2.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from psft_plugin.mlx_train.config import load_config
from psft_plugin.mlx_train.run import run
from psft_plugin.options import ConfigError


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, validate, train. Returns the exit status (0, or 2 for a configuration error)."""
    try:
        run(load_config(argv), log=lambda line: print(line, flush=True))
    except ConfigError as error:
        print(f"psft_plugin.mlx_train: {error}", file=sys.stderr)
        return 2
    return 0
