"""``python -m psft_plugin.integrations.swift sft ...`` (the same as ``psft-swift sft ...``)."""

import sys

from psft_plugin.integrations.swift.cli import main

sys.exit(main())
