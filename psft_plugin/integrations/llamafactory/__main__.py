"""``python -m psft_plugin.integrations.llamafactory train cfg.yaml`` (the ``psft-llamafactory`` script)."""

import sys

from psft_plugin.integrations.llamafactory.cli import main

if __name__ == "__main__":
    sys.exit(main())
