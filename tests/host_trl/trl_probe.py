"""Test-only: ``python -m trl_probe --config cfg.yaml`` is ``psft-trl`` recording which engine trained.

On CPU, accelerate silently swaps FSDP for DDP unless the test-only patches of ``tests/cpu_site``
restore it, so a run that exits 0 proves nothing. This wrapper adds a callback to every
``PSFTTrainer`` that writes ``engine-rank<r>.json`` into the output directory: the accelerator's
``distributed_type`` and ``fsdp2`` flag, and a ``q_proj`` weight's class and global / local sizes
after each optimizer step and when PSFT's old-policy pass starts (a ``DTensor`` shard under FSDP2).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from psft_plugin.integrations.trl import PSFTTrainer, cli

PROBED = ("self_attn.q_proj.weight", "self_attn.q_proj.base_layer.weight")  # plain, under LoRA


def parameter_layout(model: Any) -> dict[str, Any]:
    """Kind, global and local numel of the first ``q_proj`` (base) weight of ``model``."""
    param = next(p for name, p in model.named_parameters() if name.endswith(PROBED))
    local = param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    return {"kind": type(param).__name__, "global_numel": param.numel(), "local_numel": local}


class Recorder(TrainerCallback):
    """Writes the engine record of its trainer after every optimizer step."""

    def __init__(self, trainer: Any):
        self.trainer, self.record = trainer, {"at_step": [], "at_stamp": []}

    def on_step_end(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        self.record.update(distributed_type=str(accelerator.distributed_type), fsdp2=bool(accelerator.is_fsdp2))
        self.record["at_step"].append(parameter_layout(self.trainer.model_wrapped))
        out = Path(self.trainer.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"engine-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(self.record))


def install() -> None:
    """Every PSFTTrainer built from now on records its engine and its old-policy passes."""
    original = PSFTTrainer.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        recorder = Recorder(self)
        self.add_callback(recorder)
        stamp = self._psft_stamp

        def recording_stamp(batches):
            if batches:
                recorder.record["at_stamp"].append(parameter_layout(self.model_wrapped))
            return stamp(batches)

        self._psft_stamp = recording_stamp

    PSFTTrainer.__init__ = __init__


if __name__ == "__main__":
    install()
    sys.exit(cli.main())
