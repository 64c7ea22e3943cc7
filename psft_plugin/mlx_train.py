"""``python -m psft_plugin.mlx_train --config X.yaml [--model PATH] [--iters N] ...``

Fine-tunes an mlx-lm model with the objective named by ``loss`` (``psft`` or ``ce``); see
docs/mlx.md. Configuration errors are printed as a list (every problem, with its fix) and exit
with status 2.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from psft_plugin.options import ConfigError


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, validate, train. Returns the exit status (0, or 2 for a configuration error)."""
    from psft_mlx.config import load_config
    from psft_mlx.run import run

    try:
        run(load_config(argv), log=lambda line: print(line, flush=True))
    except ConfigError as error:
        print(f"psft_plugin.mlx_train: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
