"""Test-only patches that let the real engines run on a CPU-only machine (never product code).

The test harness puts this folder first on ``PYTHONPATH`` of the host CLIs it starts (``axolotl
train``, ``llamafactory-cli train``, ...), so Python imports this module at start-up in every
process of the run (the CLI, accelerate's launcher, each torchrun rank). Each patch is applied
lazily, right after the module it changes is imported, and each names the upstream code it works
around. On a GPU none of them is needed.

Always on:

- ``torch.cuda.can_device_access_peer`` raises ``RuntimeError`` on a CUDA build of torch with no
  driver, where the CPU build raises the ``AssertionError`` that Axolotl's
  ``axolotl.utils.environment.check_cuda_p2p_ib_support`` catches. Without CUDA we raise the
  latter, so multi-process runs behave the same on both torch builds.

With ``PSFT_TEST_HIDE_AXOLOTL_ENTRY_POINT=1``: ``importlib.metadata.entry_points`` leaves out our
``axolotl.plugins`` entry point, so a run sees Axolotl as if psft-plugin were not installed (the
reference for "a config that does not ask for us trains untouched").

With ``PSFT_TEST_CPU_ENGINE=1`` (the engine tests):

- ``accelerate.state.AcceleratorState.__init__`` sets ``distributed_type`` to FSDP only for GPU-like
  multi-process types and to DeepSpeed only when ``not cpu``; under ``use_cpu`` (the only way
  accelerate joins torchrun's gloo group on CPU) both engines are silently replaced by DDP. We
  restore the engine the run asked for after the original ``__init__`` (in ``PartialState``'s
  shared dict too, which every later ``AcceleratorState()`` copies over its own).
- ``accelerate.parallelism_config.ParallelismConfig.build_device_mesh`` is called with a hard-coded
  ``"cuda"`` by Axolotl's ``axolotl.utils.distributed.build_parallelism_config``; without CUDA the
  mesh is built on ``"cpu"`` (gloo) instead.
- ``deepspeed.runtime.zero.partition_parameters.Init.__init__`` (``deepspeed.zero.Init``, which
  transformers' ``from_pretrained`` enters for a ZeRO-3 model) reads the world size from
  ``deepspeed.comm`` in ``DeepSpeedConfig`` before it initialises ``deepspeed.comm`` itself; not yet
  initialised, it counts one process and the batch check fails (``train_batch_size is not equal to
  micro_batch_per_gpu * gradient_acc_step * world_size 4 != 1 * 2 * 1``). On a GPU,
  ``TrainingArguments._setup_devices`` has accelerate's ``PartialState`` initialise ``deepspeed.comm``
  while the training arguments are built (``ACCELERATE_USE_DEEPSPEED``); under ``cpu=True`` it only
  creates torch's gloo group. LLaMA-Factory loads the model before its trainer exists (plain
  ``llamafactory-cli train`` too), so ``deepspeed.comm`` is initialised over that group first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Callable


def _torch_cuda(module) -> None:
    original = module.can_device_access_peer

    def can_device_access_peer(device, peer_device):
        if not module.is_available():
            raise AssertionError("no CUDA device (test harness: CPU-only machine)")
        return original(device, peer_device)

    module.can_device_access_peer = can_device_access_peer


def _accelerate_state(module) -> None:
    original = module.AcceleratorState.__init__
    distributed = module.DistributedType

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.distributed_type != distributed.MULTI_CPU:
            return
        fsdp_plugin = kwargs.get("fsdp_plugin")
        deepspeed_plugin = kwargs.get("deepspeed_plugin")
        if fsdp_plugin is not None:
            self.distributed_type = distributed.FSDP
            self.fsdp_plugin = fsdp_plugin
        elif deepspeed_plugin is not None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            from deepspeed import comm

            if not comm.is_initialized():
                comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
            self.distributed_type = distributed.DEEPSPEED
            self._mixed_precision = "no"
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
        else:
            return
        # Every later AcceleratorState() copies PartialState's shared dict over its own first.
        module.PartialState._shared_state["distributed_type"] = self.distributed_type

    module.AcceleratorState.__init__ = __init__


def _accelerate_parallelism(module) -> None:
    original = module.ParallelismConfig.build_device_mesh

    def build_device_mesh(self, device_type):
        import torch

        if device_type == "cuda" and not torch.cuda.is_available():
            device_type = "cpu"
        return original(self, device_type)

    module.ParallelismConfig.build_device_mesh = build_device_mesh


def _deepspeed_zero_init(module) -> None:
    original = module.Init.__init__

    def __init__(self, *args, **kwargs):
        import torch.distributed
        from deepspeed import comm

        if torch.distributed.is_initialized() and not comm.is_initialized():
            comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        original(self, *args, **kwargs)

    module.Init.__init__ = __init__


def _hide_our_axolotl_entry_point() -> None:
    from importlib import metadata

    original = metadata.entry_points

    def entry_points(**params):
        found = original(**params)
        if params.get("group") != "axolotl.plugins":
            return found
        return metadata.EntryPoints(ep for ep in found if not ep.value.startswith("psft_plugin."))

    metadata.entry_points = entry_points


if os.environ.get("PSFT_TEST_HIDE_AXOLOTL_ENTRY_POINT") == "1":
    _hide_our_axolotl_entry_point()

PATCHES: dict[str, Callable] = {"torch.cuda": _torch_cuda}
if os.environ.get("PSFT_TEST_CPU_ENGINE") == "1":
    PATCHES.update(
        {
            "accelerate.state": _accelerate_state,
            "accelerate.parallelism_config": _accelerate_parallelism,
            "deepspeed.runtime.zero.partition_parameters": _deepspeed_zero_init,
        }
    )


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules through the other finders and patches them once executed."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, PATCHES[name]

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
