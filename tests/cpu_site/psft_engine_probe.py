"""Test-only Axolotl plugin recording which engine really trained, for the engine tests.

On CPU, accelerate silently swaps FSDP and DeepSpeed for DDP (see ``sitecustomize``), so a run
that exits 0 proves nothing. Listed under ``plugins:`` in an engine test's config, this plugin
writes ``engine-rank<r>.json`` into the output directory with, per rank:

- ``distributed_type``, ``fsdp2`` and ``zero_stage`` as the trainer's accelerator sees them;
- ``at_step``: a parameter's global and local sizes after each optimizer step (outside any
  forward): a shard under FSDP2 (a ``DTensor``) and ZeRO-3 (an empty ``param`` with a partition);
- ``at_stamp``: the same, read as PSFT's old-policy pass starts, so the stamp provably runs on
  sharded weights;
- ``head``: the LM head weight's layout after the last step (sharded or whole);
- ``head_rows``: for every call of the LM head that produced logits (``[..., V]``), how many rows
  of logits it built: ``B x T`` with full logits, at most a chunk with ``psft_lm_head_chunk_size``
  (after one 8-position check of the model's logit transform). The chunked-head tests read it to
  prove that no ``[B, T, V]`` tensor was built, by shapes rather than by memory figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

PROBED = "self_attn.q_proj.weight"
HEAD = "lm_head.weight"


def parameter_layout(model: Any, suffix: str = PROBED) -> dict[str, Any]:
    """Global numel, local numel and kind of the first weight of ``model`` named ``...suffix``."""
    name, param = next((n, p) for n, p in model.named_parameters() if n.endswith(suffix))
    layout = {"name": name, "kind": type(param).__name__, "local_numel": param.data.numel()}
    if hasattr(param, "to_local"):  # FSDP2 DTensor
        layout.update(global_numel=param.numel(), local_numel=param.to_local().numel())
    elif hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 partitioned parameter
        layout.update(global_numel=param.ds_numel, partition_numel=param.ds_tensor.numel(), status=str(param.ds_status))
    else:
        layout["global_numel"] = param.numel()
    return layout


class _Recorder(TrainerCallback):
    def __init__(self, trainer: Any):
        self.trainer, self.record = trainer, {"at_step": [], "at_stamp": [], "head_rows": []}
        head = trainer.model.get_output_embeddings()
        vocab = trainer.model.config.vocab_size
        head.register_forward_hook(lambda module, args, output: self.head_call(output, vocab))

    def head_call(self, logits: Any, vocab: int) -> None:
        """Count the rows of a head call's logits (the chunked path's placeholders have width 0)."""
        if logits.shape[-1] == vocab:
            self.record["head_rows"].append(logits.numel() // vocab)

    def engine(self) -> dict[str, Any]:
        accelerator, model = self.trainer.accelerator, self.trainer.model_wrapped
        stage = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else None
        return {
            "distributed_type": str(accelerator.distributed_type),
            "fsdp2": bool(accelerator.is_fsdp2),
            "zero_stage": stage,
            "model_class": type(model).__name__,
        }

    def on_step_end(self, args, state, control, **kwargs):
        self.record.update(self.engine())
        self.record["at_step"].append(parameter_layout(self.trainer.model_wrapped))
        self.record["head"] = parameter_layout(self.trainer.model_wrapped, HEAD)
        self.write()

    def write(self) -> None:
        rank = int(os.environ.get("RANK", "0"))
        out = Path(self.trainer.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"engine-rank{rank}.json").write_text(json.dumps(self.record, indent=1))


class EngineProbePlugin(BasePlugin):
    """Adds the recorder callback and wraps PSFT's old-policy pass to record the layout there."""

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        recorder = _Recorder(trainer)
        trainer.add_callback(recorder)
        stamp = getattr(trainer, "_psft_stamp", None)
        if stamp is None:
            return

        def recording_stamp(batches):
            if batches:
                recorder.record["at_stamp"].append(parameter_layout(trainer.model_wrapped))
            return stamp(batches)

        trainer._psft_stamp = recording_stamp
