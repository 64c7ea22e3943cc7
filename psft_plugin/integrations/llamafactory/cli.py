"""``psft-llamafactory train cfg.yaml``: ``llamafactory-cli train`` with ``loss:`` and the objective's keys.

LLaMA-Factory has no plugin point on its classic training path: its argument parser stops at
a key it does not know (or, with ``ALLOW_EXTRA_ARGS=1``, drops it silently), the loss is picked
by ``use_*_loss`` switches inside ``CustomSeq2SeqTrainer.__init__``, ``run_exp`` takes callbacks
but no trainer, and a multi-process run re-executes a file of LLaMA-Factory's under ``torchrun``.
So this entry point does what ``llamafactory-cli train`` does, with two small patches, each
undone when it returns and each made only on the release they were tested with
(:data:`TESTED`):

1. :func:`sft_workflow_trainer`: ``llamafactory.train.sft.workflow`` builds the trainer from its
   module-level name ``CustomSeq2SeqTrainer``; we bind that name to our subclass for the run.
2. :func:`relaunch`: LLaMA-Factory's launcher (``llamafactory.launcher.launch``) re-executes
   ``torchrun ... {__file__} ARGS`` with its own ``__file__``; we point that name at our worker
   (:mod:`.worker`), so every rank applies patch 1 and trains the objective, never plain CE,
   while LLaMA-Factory keeps building the ``torchrun`` command (``NNODES``, ``NPROC_PER_NODE``,
   ``MASTER_*``, elastic ``RDZV_*``).

Everything is checked before any model loads or file is written (:func:`.args.plan`); a bad
configuration prints every problem with its fix and exits with status 2, without a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional, Sequence

from psft_plugin.integrations.llamafactory.args import Plan, plan
from psft_plugin.options import ConfigError

PROG = "psft-llamafactory"
USAGE = f"usage: {PROG} train CONFIG.yaml [key=value ...]  (the YAML of `llamafactory-cli train`, plus `loss:`)"
TESTED = (">=0.9.5", "<0.9.6")
"""The llamafactory releases whose ``workflow`` and ``launcher`` the two patches were tested on."""
WORKER = Path(__file__).with_name("worker.py")
# LLaMA-Factory 0.9.5 checks its pins at import (transformers<=5.6, datasets<=4.0, peft<=0.20,
# trl<=0.24) and stops unless DISABLE_VERSION_CHECK=1. Its SFT path trains the same weights with
# newer datasets (4.8, which ms-swift needs in the same environment), and the release that
# matters here, LLaMA-Factory's own, is checked by `check_release`. Set to 0 to restore its checks.
ENVIRONMENT_DEFAULTS = {"DISABLE_VERSION_CHECK": "1"}


def check_release() -> None:
    """Raise :class:`ConfigError` unless the installed llamafactory is in :data:`TESTED`."""
    from packaging.specifiers import SpecifierSet

    try:
        version = metadata.version("llamafactory")
    except metadata.PackageNotFoundError:
        raise ConfigError([f"LLaMA-Factory is not installed; `pip install 'llamafactory{','.join(TESTED)}'`"])
    if version not in SpecifierSet(",".join(TESTED)):
        raise ConfigError(
            [
                f"{PROG} is tested with llamafactory {','.join(TESTED)} and found {version}: it replaces "
                f"`CustomSeq2SeqTrainer` in `llamafactory.train.sft.workflow` and the worker file of "
                f"`llamafactory.launcher`, which another release may have changed; install "
                f"`llamafactory{','.join(TESTED)}`"
            ]
        )


def read_config(args: Sequence[str]) -> dict:
    """The YAML (or JSON) ``args[0]`` with ``key=value`` overrides, read as ``llamafactory-cli train`` reads it."""
    from llamafactory.hparams import read_args

    if not args or Path(args[0]).suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError([f"give the training configuration as a .yaml or .json file; {USAGE}"])
    if not Path(args[0]).is_file():
        raise ConfigError([f"`{args[0]}`: no such file"])
    saved, sys.argv = sys.argv, [PROG, *args]
    try:
        config = read_args()
    except Exception as error:  # omegaconf and yaml raise their own types for a malformed file
        raise ConfigError([f"`{args[0]}` cannot be read: {error}"]) from error
    finally:
        sys.argv = saved
    if not isinstance(config, dict):
        raise ConfigError([f"`{args[0]}` must hold a mapping of LLaMA-Factory keys"])
    return config


def launches_workers() -> bool:
    """LLaMA-Factory's own rule (``llamafactory.launcher.launch``) for re-executing under ``torchrun``.

    A process that ``torchrun`` started (``LOCAL_RANK`` set) trains itself.
    """
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray

    if "LOCAL_RANK" in os.environ:
        return False
    return (
        is_env_enabled("FORCE_TORCHRUN")
        or is_env_enabled("USE_MCA")
        or (get_device_count() > 1 and not use_ray() and not use_kt())
    )


def relaunch(args: Sequence[str]) -> int:
    """Run ``args`` under LLaMA-Factory's ``torchrun`` launcher with :data:`WORKER` as each rank's program."""
    from llamafactory import launcher

    saved = sys.argv, launcher.__file__
    sys.argv, launcher.__file__ = [PROG, "train", *args], str(WORKER)
    try:
        launcher.launch()
    except SystemExit as exit:
        return int(exit.code or 0)
    except subprocess.CalledProcessError as error:  # a rank failed; its output says why
        return error.returncode
    finally:
        sys.argv, launcher.__file__ = saved
    return 0


@contextmanager
def sft_workflow_trainer(trainer_cls: type) -> Iterator[None]:
    """Bind the SFT workflow's name ``CustomSeq2SeqTrainer`` to ``trainer_cls`` while the block runs."""
    from llamafactory.train.sft import workflow

    original = workflow.CustomSeq2SeqTrainer
    workflow.CustomSeq2SeqTrainer = trainer_cls
    try:
        yield
    finally:
        workflow.CustomSeq2SeqTrainer = original


def train(run: Plan) -> int:
    """Train ``run`` in this process through LLaMA-Factory's ``run_exp``; the exit status."""
    from llamafactory.train.tuner import run_exp

    if run.settings is None:  # no `loss:`, no objective key: LLaMA-Factory's own run
        run_exp(dict(run.host))
        return 0
    from psft_plugin.integrations.llamafactory.trainer import trainer_class

    trainer_cls = trainer_class(run.trainer_config)
    with sft_workflow_trainer(trainer_cls):
        run_exp(dict(run.host))
    if trainer_cls.instances == 0:  # never report a run as `loss: psft` that trained something else
        print(f"{PROG}: LLaMA-Factory ran without building the psft-plugin trainer", file=sys.stderr)
        return 1
    return 0


def setup() -> None:
    """The environment defaults (:data:`ENVIRONMENT_DEFAULTS`), then the release check."""
    for name, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    check_release()


def report(error: ConfigError) -> int:
    """Print a configuration error (on the first rank only) and return the exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: {error}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``psft-llamafactory train CONFIG [key=value ...]``; returns the exit status (2: bad configuration)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["train"]:
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        setup()
        launching = launches_workers()
        run = plan(read_config(argv[1:]), launching=launching)
    except ConfigError as error:
        return report(error)
    return relaunch(argv[1:]) if launching else train(run)


def train_worker(args: Sequence[str]) -> int:
    """One ``torchrun`` rank (:mod:`.worker`): validate (every rank alike) and train."""
    try:
        setup()
        run = plan(read_config(args))
    except ConfigError as error:
        return report(error)
    return train(run)
