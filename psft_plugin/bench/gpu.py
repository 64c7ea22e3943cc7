"""One prepared GPU check: ``python -m psft_plugin.bench.gpu`` (``make gpu-check``), docs/gpu.md.

On one CUDA device, within ~8 minutes, four items, each measured or plainly skipped:

1. **correctness** through the real ``axolotl train`` (bf16, LoRA, sdpa and flash-attention where
   installed): ``loss: psft`` K = 1 against ``loss: ce`` (the ``psft/nll`` trajectory and the final
   adapter, within the bf16 tolerances of :mod:`psft_plugin.bench.gpu_axolotl`), and K = 8 with
   ``sample_packing: true``: clip fraction 0 on each window's first step, > 0 later;
2. **speed**: PSFT (K = 8) / SFT step time against the bound ``1 + (K-1)/K * t_fwd / t_step``
   measured in the same run (:mod:`psft_plugin.bench.steps_torch`, synchronized timings),
   SmolLM2-135M at 8 x 2048 tokens;
3. **memory**: peak ``torch.cuda.max_memory_allocated`` of plain CE, PSFT with full logits, PSFT
   with ``psft_lm_head_chunk_size`` and the fused CE kernels where installed (Liger,
   cut-cross-entropy), V = 128k and 256k, T = 4k (:mod:`psft_plugin.bench.gpu_memory`);
4. **multi-GPU** (2+ devices): FSDP2 and ZeRO-3 K = 1 against CE, 2 processes against 1, NCCL.

Writes ``.cache/gpu-check/report.json`` and prints one verdict line per item; exits 1 when a
correctness item (1 or 4) fails or an item breaks (status ``error``, the others still run). ``--device cpu --quick`` runs the same code on the tiny model
in float32 (bf16 on CPU is slow), for the test suite: every figure then says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from psft_plugin.bench import gpu_axolotl
from psft_plugin.bench.__main__ import QUICK, run_worker, summarize

WORK = Path(".cache/gpu-check")
BUDGET_S = 480
SPEED = {"batch_size": 8, "seq_len": 2048, "refresh_steps": 8, "windows": 2, "rounds": 2}
MEMORY_GRID = {"full": [(131072, 4096), (262144, 4096)], "quick": [(4096, 512)]}
MODEL_NAMES = {False: "SmolLM2-135M", True: "tiny Llama"}  # by --quick


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny model, float32, small sizes (the suite's run)")
    parser.add_argument("--work", type=Path, default=WORK, help="runs' folder; the report is WORK/report.json")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="items not started by then are skipped")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.quick:
        parser.error("--device cpu needs --quick: SmolLM2 at 8 x 2048 tokens per step would take hours on a CPU")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device; on a CPU machine run `--device cpu --quick`")
    return args


def single_device_env(device: str) -> dict[str, str]:
    """One visible GPU for single-process runs (a Trainer seeing several would wrap DataParallel)."""
    if device != "cuda":
        return {}
    return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}


def dtype(args: argparse.Namespace) -> str:
    """bf16 on CUDA (what users train in); float32 in ``--quick`` (the tiny model; bf16 is slow on CPUs)."""
    return "bfloat16" if args.device == "cuda" and not args.quick else "float32"


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """The machine, library versions, dtype and mode of this report."""
    import torch
    import transformers

    described = {"device": args.device, "quick": args.quick, "dtype": dtype(args)}
    described.update(torch=torch.__version__, transformers=transformers.__version__)
    if args.device == "cuda":
        described.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    else:
        described.update(cpu=platform.processor() or platform.machine(), cpus=os.cpu_count())
        described["note"] = (
            "CPU run: float32 on the tiny model (bf16 is slow on CPU), items overlapping; no figure is a GPU figure"
        )
    return described


def assets(work: Path, quick: bool) -> tuple[Path, Path]:
    """(model, chat data): the tiny model and its 64 chats (``--quick``), or SmolLM2-135M and 1024
    chats of the same kind (``sample_packing`` puts ~15 of them in each 512-token row, and 16 steps
    of 8 rows need more than 64)."""
    from psft_plugin.assets import tiny

    model_dir, data_dir = tiny.build(work / "tiny")
    if quick:
        return model_dir, data_dir
    from psft_plugin.assets import smollm2

    return smollm2.build(), tiny.write_dataset(work / "chats-1024", train=1024)


def lane(args: argparse.Namespace, model_dir: Path, data_dir: Path) -> gpu_axolotl.Lane:
    """Item 1's recipe: 2 windows of K = 8 steps; SmolLM2 in bf16 on CUDA, the tiny model in float32 quick."""
    if args.quick:
        return gpu_axolotl.Lane(args.device, dtype(args), model_dir, data_dir, 16, 2, 128, 1e-2)
    return gpu_axolotl.Lane(args.device, dtype(args), model_dir, data_dir, 16, 8, 512, 2e-3)


def correctness_item(args: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    result = gpu_axolotl.correctness(
        lane(args, model_dir, data_dir), args.work / "correctness", single_device_env(args.device)
    )
    return {"status": "pass" if result["ok"] else "fail", **result}


def speed_item(args: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """PSFT (K = 8) / SFT step time and the bound, from one interleaved worker run."""
    setup = {
        **(QUICK if args.quick else SPEED),
        "device": args.device,
        "dtype": dtype(args),
    }
    raw = run_worker(
        "psft_plugin.bench.steps_torch", str(model_dir), json.dumps(setup), env=single_device_env(args.device)
    )
    summary = summarize(raw, setup["refresh_steps"])
    tokens = f"{setup['batch_size']} x {setup['seq_len']} tokens"
    verdict = (
        f"PSFT (K={setup['refresh_steps']}) / SFT step time {summary['step_time_ratio']:.3f}, bound "
        f"{summary['bound']:.3f} (t_fwd {summary['forward_seconds'] * 1e3:.1f} ms, SFT t_step "
        f"{summary['sft_step_seconds'] * 1e3:.1f} ms; {MODEL_NAMES[args.quick]}, {tokens}, {setup['dtype']})"
    )
    return {"status": "measured", "setup": setup, "summary": summary, "raw": raw, "verdict": verdict}


def memory_workers(device: str, vocab: int, seq_len: int) -> tuple[list[list[str]], list[dict]]:
    """Worker mode lists for one point (plain modes together, each fused kernel alone) and skipped rows."""
    from psft_plugin.bench import gpu_memory  # imports the trainer stack: only in the item that runs it

    groups, skipped = [list(gpu_memory.PLAIN_MODES)], []
    for mode in gpu_memory.FUSED_MODES:
        reason = gpu_memory.unavailable(mode, device)
        if reason:
            skipped.append({"mode": mode, "vocab": vocab, "seq_len": seq_len, "skipped": reason})
        else:
            groups.append([mode])
    return groups, skipped


def memory_item(args: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Peak bytes per (point, mode); the verdict compares chunked PSFT with CE and the fused kernels."""
    rows: list[dict] = []
    for vocab, seq_len in MEMORY_GRID["quick" if args.quick else "full"]:
        groups, skipped = memory_workers(args.device, vocab, seq_len)
        for modes in groups:
            try:
                rows += run_worker(
                    "psft_plugin.bench.gpu_memory",
                    args.device,
                    str(vocab),
                    str(seq_len),
                    *modes,
                    env=single_device_env(args.device),
                )
            except subprocess.CalledProcessError as error:  # its stderr went to the console
                rows += [
                    {"mode": m, "vocab": vocab, "seq_len": seq_len, "error": f"exit {error.returncode}"} for m in modes
                ]
        rows += skipped
    status = "error" if any("error" in row for row in rows) else "measured"
    return {"status": status, "rows": rows, "verdict": memory_verdict(rows)}


def memory_cell(row: dict) -> str:
    """``123 MiB``, ``skipped (why)`` or ``error (exit N)``."""
    if "peak_bytes" in row:
        return f"{row['peak_bytes'] / 2**20:.0f} MiB"
    return f"skipped ({row['skipped']})" if "skipped" in row else f"error ({row['error']})"


def memory_verdict(rows: list[dict]) -> str:
    """``V=.. T=..: mode peak MiB, ...`` per point, and chunked PSFT's peak over each fused kernel's."""
    from psft_plugin.bench.gpu_memory import FUSED_MODES

    parts = []
    for point in dict.fromkeys((row["vocab"], row["seq_len"]) for row in rows):
        cells = {row["mode"]: row for row in rows if (row["vocab"], row["seq_len"]) == point}
        peaks = ", ".join(f"{mode} {memory_cell(cell)}" for mode, cell in cells.items())
        chunked = cells["psft-chunked"].get("peak_bytes")
        ratios = "".join(
            f", chunked PSFT / {mode} {chunked / cells[mode]['peak_bytes']:.2f}"
            for mode in FUSED_MODES
            if chunked and "peak_bytes" in cells.get(mode, {})
        )
        parts.append(f"V={point[0]} T={point[1]}: {peaks}{ratios}")
    return "; ".join(parts)


def multi_gpu_item(args: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """FSDP2 / ZeRO-3 / 2 processes on the tiny model in float32 (exact tolerances), or why not."""
    if args.device != "cuda":
        return {"status": "skipped", "verdict": "skipped: --device cpu (needs 2 or more CUDA devices)"}
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return {"status": "skipped", "verdict": f"skipped: {count} device"}
    tiny_model, tiny_data = (args.work / "tiny" / "model", args.work / "tiny" / "data")
    multi_lane = gpu_axolotl.Lane("cuda", "float32", tiny_model, tiny_data, 4, 1, 128, 1e-2, refresh_steps=2)
    result = gpu_axolotl.multi_gpu(multi_lane, args.work / "multi_gpu")
    return {"status": "pass" if result["ok"] else "fail", **result}


ITEMS: dict[str, Callable[[argparse.Namespace, Path, Path], dict[str, Any]]] = {
    "1 correctness": correctness_item,
    "2 speed": speed_item,
    "3 memory": memory_item,
    "4 multi-gpu": multi_gpu_item,
}


def run_item(name: str, args: argparse.Namespace, model_dir: Path, data_dir: Path, start: float) -> dict[str, Any]:
    """One item's result with its seconds; skipped once the time budget is spent."""
    began = time.monotonic()
    if began - start > args.budget_s:
        return {"status": "skipped", "verdict": f"skipped: time budget of {args.budget_s:.0f} s spent"}
    try:
        result = ITEMS[name](args, model_dir, data_dir)
    except Exception as error:  # reported as this item's verdict; the other items still run
        result = {"status": "error", "verdict": f"error: {type(error).__name__}: {error}"}
    return {**result, "seconds": round(time.monotonic() - began, 1)}


def run_items(args: argparse.Namespace, model_dir: Path, data_dir: Path, start: float) -> dict[str, dict]:
    """Every item; prints each verdict line, in item order, when it is done.

    On CUDA the items run one after another, so that each timing and peak is the item's alone. On
    the CPU (``--quick``, whose timings are no figures to read) two run at once: the speed and
    memory workers fill the core that item 1's last ``axolotl train`` leaves idle.
    """
    items: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=1 if args.device == "cuda" else 2) as pool:
        futures = {name: pool.submit(run_item, name, args, model_dir, data_dir, start) for name in ITEMS}
        for name, future in futures.items():
            items[name] = future.result()
            print(f"[{name}] {items[name]['status'].upper()}: {items[name]['verdict']}", flush=True)
    return items


def main(argv: Optional[list[str]] = None) -> int:
    """Run the check; write WORK/report.json; 1 if a correctness item failed or an item broke, else 0."""
    args = parse_args(argv)
    start = time.monotonic()
    model_dir, data_dir = assets(args.work, args.quick)
    report: dict[str, Any] = {"machine": describe(args), "model": str(model_dir)}
    report["items"] = run_items(args, model_dir, data_dir, start)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["failed"] = [name for name, item in report["items"].items() if item["status"] in ("fail", "error")]
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"report: {args.work / 'report.json'} ({report['seconds']:.0f} s)")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
