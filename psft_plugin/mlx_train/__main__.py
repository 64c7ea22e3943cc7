"""``python -m psft_plugin.mlx_train``: see :func:`psft_plugin.mlx_train.main`."""

import sys

from psft_plugin.mlx_train import main

sys.exit(main())
