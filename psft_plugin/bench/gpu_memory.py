"""Peak memory of optimizer steps at large vocabularies, fused CE kernels included (a worker of
``psft_plugin.bench.gpu``, item 3).

The body is :func:`psft_plugin.bench.lm_head_steps.tiny_model` (hidden 64, 2 layers) with a
``VOCAB``-entry head, so the LM head and its logits are what a step's memory is made of; one row
of ``SEQ_LEN`` tokens per micro-batch, :data:`~psft_plugin.bench.lm_head_steps.STEPS` steps, after one
unmeasured short warm-up run. Modes:

- ``ce``: plain ``transformers.Trainer``, the model's own cross-entropy;
- ``psft``: ``loss: psft`` with full logits; ``psft-chunked``: with ``psft_lm_head_chunk_size``;
- ``liger-flce``: plain ``Trainer`` on a model whose forward Liger's fused linear CE replaced
  (``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True)``): no ``[T, V]`` logits;
- ``cce``: the same with ``cut_cross_entropy.transformers.cce_patch``.

The fused kernels are Triton (CUDA only) and patch the model's forward, so each runs in a worker
of its own. The peak is ``torch.cuda.max_memory_allocated`` above what was allocated before
``trainer.train()`` on CUDA (the resident set on CPU, see :mod:`psft_plugin.bench.memory`).

    python -m psft_plugin.bench.gpu_memory DEVICE VOCAB SEQ_LEN MODE [MODE ...]   # prints a JSON list
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
import tempfile
from typing import Any

import torch
from transformers import Trainer

from psft_plugin.bench.lm_head_steps import CHUNK, REFRESH_STEPS, STEPS, tiny_model
from psft_plugin.bench.memory import torch_peak_bytes
from psft_plugin.bench.steps_torch import bench_training_args, fixed_batch
from psft_plugin.objectives import LM_HEAD_CHUNK_KEY
from psft_torch.trainer import PSFTTrainer

PLAIN_MODES = ("ce", "psft", "psft-chunked")
FUSED_MODES = {"liger-flce": "liger_kernel", "cce": "cut_cross_entropy"}  # mode: the module it needs


def unavailable(mode: str, device: str) -> str:
    """Why ``mode`` cannot run here ("" when it can)."""
    if mode not in FUSED_MODES:
        return ""
    if importlib.util.find_spec(FUSED_MODES[mode]) is None:
        return f"not installed ({FUSED_MODES[mode]})"
    if not device.startswith("cuda"):
        return "needs a CUDA device (Triton kernel)"
    return ""


def _patched(model, mode: str):
    """``model`` with its forward replaced by the fused CE kernel of ``mode`` (unchanged otherwise)."""
    if mode == "liger-flce":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=False, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=False, swiglu=False, model=model
        )
    elif mode == "cce":
        from cut_cross_entropy.transformers import cce_patch

        model = cce_patch(model)
    return model


def measure(device: str, vocab: int, seq_len: int, mode: str) -> dict[str, Any]:
    """Peak bytes of ``STEPS`` optimizer steps of one mode (bf16 weights and autocast on CUDA)."""
    bf16 = device.startswith("cuda")
    model = _patched(tiny_model(vocab, seq_len).to(device, torch.bfloat16 if bf16 else torch.float32), mode)
    dataset = fixed_batch(vocab, 1, seq_len, STEPS)
    with tempfile.TemporaryDirectory() as out_dir:
        args = bench_training_args(out_dir, STEPS, 1, 1e-4, device=device, bf16=bf16)
        if mode in ("psft", "psft-chunked"):
            config = {
                "loss": "psft",
                "psft_refresh_steps": REFRESH_STEPS,
                LM_HEAD_CHUNK_KEY: CHUNK if mode == "psft-chunked" else 0,
            }
            trainer = PSFTTrainer(model=model, args=args, train_dataset=dataset, psft_config=config)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=dataset)
        peak = torch_peak_bytes(trainer.train, device)
    del trainer, model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "mode": mode,
        "vocab": vocab,
        "seq_len": seq_len,
        "dtype": "bfloat16" if bf16 else "float32",
        "peak_bytes": peak,
        "logits_fp32_bytes": 4 * vocab * seq_len,
    }


def main(argv: list[str]) -> list[dict[str, Any]]:
    device, vocab, seq_len, modes = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    unknown = [mode for mode in modes if mode not in PLAIN_MODES and mode not in FUSED_MODES]
    if unknown or not modes:
        raise SystemExit(f"modes {modes or '(none)'}: name one or more of {PLAIN_MODES + tuple(FUSED_MODES)}")
    measure(device, vocab, 64, modes[0])  # warm-up: one-off allocations (thread pools, cuBLAS) are no mode's peak
    return [measure(device, vocab, seq_len, mode) for mode in modes]


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(main(sys.argv[1:])))
