"""Peak memory and step time of optimizer steps through the real trainer, at large vocabularies.

One process per measurement (``python -m psft_plugin.bench.lm_head_steps MODE VOCAB SEQ_LEN``,
with :data:`psft_plugin.bench.memory.WORKER_ENV`), printing one JSON object. The model is a
randomly initialised Llama with a tiny body (hidden 64, 2 layers) and a ``VOCAB``-entry head, so
the LM head and its logits are what the step's memory is made of. One row of ``SEQ_LEN`` tokens
per micro-batch, the first quarter of it prompt (label -100). Modes:

- ``ce``: plain ``transformers.Trainer``, the model's own cross-entropy (the host's loss);
- ``psft``: :class:`psft_torch.trainer.PSFTTrainer`, ``loss: psft`` with full logits;
- ``psft-chunked``: the same with ``psft_lm_head_chunk_size: CHUNK``.

The peak is the process's peak resident set during ``trainer.train()`` above the resident set
before it (model, data and torch already loaded); the step time is the median interval between
optimizer steps after the first.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from typing import Any

import torch
from transformers import LlamaForCausalLM, Trainer

from psft_plugin.assets import tiny
from psft_plugin.bench.memory import torch_peak_bytes
from psft_plugin.bench.steps_torch import StepTimer, bench_training_args, fixed_batch
from psft_plugin.objectives import LM_HEAD_CHUNK_KEY
from psft_torch.trainer import PSFTTrainer

MODES = ("ce", "psft", "psft-chunked")
CHUNK = 1024
STEPS = 4
REFRESH_STEPS = 8  # the default K: steps after the first are stamped steps (r != 1), none restamps


def tiny_model(vocab: int, seq_len: int) -> LlamaForCausalLM:
    """The tiny Llama (:func:`psft_plugin.assets.tiny.llama_config`) with ``vocab`` outputs, float32, seeded."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny.llama_config(vocab, max_position_embeddings=seq_len)).to(torch.float32)


def measure(mode: str, vocab: int, seq_len: int, chunk: int = CHUNK) -> dict[str, Any]:
    """Peak bytes of ``STEPS`` optimizer steps and their median step seconds, for one mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = tiny_model(vocab, seq_len)
    dataset = fixed_batch(vocab, 1, seq_len, STEPS)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = bench_training_args(out_dir, STEPS, 1, 1e-4)
        kwargs = dict(model=model, args=args, train_dataset=dataset, callbacks=[timer])
        if mode == "ce":
            trainer = Trainer(**kwargs)
        else:
            config = {
                "loss": "psft",
                "psft_refresh_steps": REFRESH_STEPS,
                LM_HEAD_CHUNK_KEY: chunk if mode == "psft-chunked" else 0,
            }
            trainer = PSFTTrainer(**kwargs, psft_config=config)
        peak = torch_peak_bytes(trainer.train)
    return {
        "mode": mode,
        "vocab": vocab,
        "seq_len": seq_len,
        "chunk": chunk if mode == "psft-chunked" else 0,
        "peak_bytes": peak,
        "step_seconds": statistics.median(timer.intervals[1:]),
        "logits_fp32_bytes": 4 * vocab * seq_len,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))


def grid(quick: bool) -> list[tuple[int, int]]:
    """(vocab, seq_len) points, smallest first."""
    if quick:
        return [(4096, 128), (4096, 512)]
    return [(v, t) for v in (32768, 131072, 262144) for t in (1024, 4096)]


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


def run_all(quick: bool, run_worker) -> list[dict]:
    """Every (point, mode), each in its own worker; a full-logits run that would not fit is skipped.

    The full-logits paths peak near 4 x one float32 logits tensor (measured here), plus ~1 GiB.
    """
    rows = []
    for vocab, seq_len in grid(quick):
        for mode in MODES:
            need = (0 if mode == "psft-chunked" else 4 * 4 * vocab * seq_len) + 2**30
            if need > available_bytes():
                rows.append(
                    {
                        "mode": mode,
                        "vocab": vocab,
                        "seq_len": seq_len,
                        "skipped": f"needs ~{need / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available",
                    }
                )
                print(f"[bench] lm-head {mode} V={vocab} T={seq_len}: skipped ({rows[-1]['skipped']})", flush=True)
                continue
            rows.append(run_worker("psft_plugin.bench.lm_head_steps", mode, str(vocab), str(seq_len)))
            print(
                f"[bench] lm-head {mode} V={vocab} T={seq_len}: peak {rows[-1]['peak_bytes'] / 2**20:.0f} MiB, "
                f"{rows[-1]['step_seconds']:.2f} s/step",
                flush=True,
            )
    return rows


def table(rows: list[dict]) -> str:
    """Peak MiB and seconds per step by (vocab, seq_len), the three modes side by side, and the targets."""
    keyed = {(r["vocab"], r["seq_len"], r["mode"]): r for r in rows}
    lines = ["  vocab  seq_len  logits MiB |  peak MiB: ce    psft  chunked | s/step: ce   psft  chunked"]
    for vocab, seq_len in dict.fromkeys((r["vocab"], r["seq_len"]) for r in rows):
        cells = [keyed.get((vocab, seq_len, mode), {}) for mode in MODES]
        peaks = " ".join(f"{c['peak_bytes'] / 2**20:7.0f}" if "peak_bytes" in c else "    n/a" for c in cells)
        times = " ".join(f"{c['step_seconds']:6.2f}" if "step_seconds" in c else "   n/a" for c in cells)
        lines.append(f"{vocab:7d} {seq_len:8d} {4 * vocab * seq_len / 2**20:11.0f} | {peaks} | {times}")
    return "\n".join(lines + targets(keyed))


def targets(keyed: dict) -> list[str]:
    """The issue's three targets, computed from the rows that were measured."""
    lines, vocabs = [], sorted({v for v, _, _ in keyed})
    big, small = (131072 if 131072 in vocabs else vocabs[-1]), vocabs[0]
    seqs = sorted({t for v, t, _ in keyed if v == big})
    ce, chunked = keyed.get((big, seqs[-1], "ce"), {}), keyed.get((big, seqs[-1], "psft-chunked"), {})
    if "peak_bytes" in ce and "peak_bytes" in chunked:
        margin = (ce["peak_bytes"] - chunked["peak_bytes"]) / ce["logits_fp32_bytes"]
        lines.append(
            f"V={big} T={seqs[-1]}: chunked PSFT peak is below plain CE's by {margin:.2f} x one "
            f"micro-batch's fp32 logits (target >= 0.5)"
        )
    for vocab in vocabs:
        peaks = [keyed.get((vocab, t, "psft-chunked"), {}).get("peak_bytes") for t in seqs]
        if len(peaks) > 1 and None not in peaks:
            lines.append(
                f"V={vocab}: chunked PSFT peak T={seqs[0]} -> T={seqs[-1]}: "
                f"{peaks[0] / 2**20:.0f} -> {peaks[-1] / 2**20:.0f} MiB "
                f"(the full logits alone grow by {4 * vocab * (seqs[-1] - seqs[0]) / 2**20:.0f} MiB)"
            )
    for seq_len in seqs:
        full, chunk = keyed.get((small, seq_len, "psft"), {}), keyed.get((small, seq_len, "psft-chunked"), {})
        if "step_seconds" in full and "step_seconds" in chunk:
            lines.append(
                f"V={small} T={seq_len}: chunked / full-logits PSFT step time "
                f"{chunk['step_seconds'] / full['step_seconds']:.2f} (target <= 1.15)"
            )
    return lines
