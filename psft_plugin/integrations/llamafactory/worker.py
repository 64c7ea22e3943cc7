"""The program ``torchrun`` runs in each rank of a multi-process ``psft-llamafactory train``.

LLaMA-Factory's launcher re-executes a *file* (``torchrun ... FILE ARGS``), not a module, and
:func:`psft_plugin.integrations.llamafactory.cli.relaunch` makes it this one, so that every rank
trains through :func:`~psft_plugin.integrations.llamafactory.cli.train_worker`.
"""

import sys

if __name__ == "__main__":
    # `python FILE` puts this file's folder first on the path, where `args.py` and `trainer.py`
    # would shadow top-level modules of those names: import everything as the package instead.
    sys.path.pop(0)
    from psft_plugin.integrations.llamafactory.cli import train_worker

    sys.exit(train_worker(sys.argv[1:]))
