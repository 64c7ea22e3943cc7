"""``python -m psft_plugin.integrations.trl``: see :func:`psft_plugin.integrations.trl.cli.main`."""

import sys

from psft_plugin.integrations.trl.cli import main

sys.exit(main())
