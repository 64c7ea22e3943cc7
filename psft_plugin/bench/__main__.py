"""PSFT's cost against SFT, measured: ``python -m psft_plugin.bench`` (``make bench``).

In one run, for each backend (torch, MLX), on the same model and batch, interleaved:

(a) step time of PSFT (K = 8) vs SFT, against the bound ``1 + (K-1)/K * t_fwd / t_step``
    (docs/objective.md section 2) with ``t_fwd`` and ``t_step`` measured in the same run;
(b) peak memory of a PSFT run vs an SFT run;
(c) peak memory of the log-prob path vs sequence length, vocabulary and chunk size;
(d) peak memory and step time of training steps through the trainer at 32k-256k vocabularies for
    plain CE, PSFT with full logits and PSFT with ``psft_lm_head_chunk_size`` (and TRL's chunked
    kernel against ours), see :mod:`psft_plugin.bench.lm_head_steps` (``--lm-head-only``: just this).

MLX runs SmolLM2 only on Apple silicon: its Linux CPU build multiplies matrices ~30x slower
than torch here (2.5 vs 76 GFLOP/s on SmolLM2's LM head), so elsewhere its figures are taken on
the tiny model (and the log-prob grid is the small one), and say so. Each backend is measured in its own worker process started with
:data:`psft_plugin.bench.memory.WORKER_ENV`. Writes every figure to a JSON file; the last
line printed is ``psft/sft step-time ratio=R (bound B); peak-mem ratio=M`` for torch (the
line for MLX comes just before it, after the line comparing MLX ``loss: ce`` with mlx-lm's own
``train``). MLX times are CPU seconds of the worker process (see ``steps_mlx``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from psft_plugin.bench.memory import WORKER_ENV

QUICK = {"batch_size": 4, "seq_len": 64, "refresh_steps": 8, "windows": 2, "rounds": 2}
FULL = {"batch_size": 4, "seq_len": 128, "refresh_steps": 8, "windows": 2, "rounds": 2}


def run_worker(module: str, *args: str, env: Optional[dict[str, str]] = None) -> Any:
    """Run ``python -m module args`` with the worker environment (plus ``env``); parse its last stdout line as JSON."""
    env = {**os.environ, **WORKER_ENV, **(env or {})}
    done = subprocess.run([sys.executable, "-m", module, *args], env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(result: dict[str, Any], refresh_steps: int) -> dict[str, float]:
    """R, B and M from a steps worker's raw figures.

    Peaks: the first run of a worker also pays one-off allocations (thread pools, caches), so
    each mode's peak is the median of its runs after the first round when there are some.
    """
    t_step = statistics.mean(result["step_seconds"]["sft"])
    t_psft = statistics.mean(result["step_seconds"]["psft"])
    t_fwd = statistics.median(result["forward_seconds"])

    def steady(peaks: list[int]) -> float:
        return statistics.median(peaks[1:] or peaks)

    return {
        "sft_step_seconds": t_step,
        "psft_step_seconds": t_psft,
        "forward_seconds": t_fwd,
        "step_time_ratio": t_psft / t_step,
        "bound": 1 + (refresh_steps - 1) / refresh_steps * t_fwd / t_step,
        "sft_peak_bytes": steady(result["peak_bytes"]["sft"]),
        "psft_peak_bytes": steady(result["peak_bytes"]["psft"]),
        "peak_mem_ratio": steady(result["peak_bytes"]["psft"]) / steady(result["peak_bytes"]["sft"]),
    }


def summary_line(summary: dict[str, float]) -> str:
    return (
        f"psft/sft step-time ratio={summary['step_time_ratio']:.3f} (bound {summary['bound']:.3f}); "
        f"peak-mem ratio={summary['peak_mem_ratio']:.3f}"
    )


def logprob_table(rows: list[dict]) -> str:
    """Peak memory of the log-prob paths, in multiples of one ``[T, V]`` float32 logits tensor."""
    lines = ["backend  seq_len   vocab  chunk   naive    ours  chunked   (peak / [T, V] fp32 logits)"]
    keyed = {(r["backend"], r["seq_len"], r["vocab"], r["chunk"], r["path"]): r for r in rows}
    for backend, t, v, c in dict.fromkeys((r["backend"], r["seq_len"], r["vocab"], r["chunk"]) for r in rows):
        ratios = [
            keyed[(backend, t, v, c, p)]["peak_bytes"] / keyed[(backend, t, v, c, p)]["logits_fp32_bytes"]
            for p in ("naive", "ours", "chunked")
        ]
        lines.append(f"{backend:7s} {t:8d} {v:7d} {c:6d} " + " ".join(f"{x:7.2f}" for x in ratios))
    return "\n".join(lines)


def lm_head_bench(quick: bool, out: Path) -> dict[str, Any]:
    """(d): one optimizer step's peak memory through the real trainer for plain CE, PSFT with full
    logits and PSFT with ``psft_lm_head_chunk_size``, and TRL's chunked kernel against ours."""
    from psft_plugin.bench import lm_head_steps, trl_compare

    print("[bench] lm-head: CE / PSFT / PSFT chunked steps through the trainer ...", flush=True)
    report = {"steps": lm_head_steps.run_all(quick, run_worker)}
    print("[bench] lm-head: TRL's _ChunkedLogProbFunction vs psft_torch.chunked ...", flush=True)
    report["trl"] = run_worker("psft_plugin.bench.trl_compare", *(["--quick"] if quick else []))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(lm_head_steps.table(report["steps"]))
    print(trl_compare.table(report["trl"]))
    return report


def default_model(quick: bool) -> Path:
    """The tiny test model (``--quick``) or SmolLM2-135M-Instruct, built offline on first use."""
    if quick:
        from psft_plugin.assets import tiny

        return tiny.build(Path(".cache/tiny"))[0]
    from psft_plugin.assets import smollm2

    return smollm2.build()


def mlx_default_model(quick: bool, model: str) -> str:
    """The model the MLX figures use: the torch one on Apple silicon, the tiny one elsewhere."""
    if platform.system() == "Darwin" or quick:
        return model
    print("[bench] mlx: Linux CPU build, too slow for SmolLM2; measuring MLX on the tiny model", flush=True)
    return str(default_model(quick=True))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, small grid (for tests)")
    parser.add_argument("--model", type=Path, help="model directory (default: SmolLM2-135M, or tiny with --quick)")
    parser.add_argument("--mlx-model", type=Path, help="model directory for MLX (default: see the module docstring)")
    parser.add_argument("--out", type=Path, default=Path(".cache/bench/bench.json"), help="where to write all figures")
    parser.add_argument(
        "--lm-head-only",
        action="store_true",
        help="only (d): the chunked LM head's step memory and TRL's kernel against ours",
    )
    args = parser.parse_args(argv)
    if args.lm_head_only:
        return lm_head_bench(args.quick, args.out)
    setup = QUICK if args.quick else FULL
    model = str(args.model or default_model(args.quick))
    models = {"torch": model, "mlx": str(args.mlx_model or mlx_default_model(args.quick, model))}
    report: dict[str, Any] = {"models": models, "setup": setup, "steps": {}, "summary": {}, "logprob": []}
    for backend in ("mlx", "torch"):
        print(f"[bench] {backend}: SFT vs PSFT (K={setup['refresh_steps']}) on {models[backend]} ...", flush=True)
        raw = run_worker(f"psft_plugin.bench.steps_{backend}", models[backend], json.dumps(setup))
        report["steps"][backend], report["summary"][backend] = raw, summarize(raw, setup["refresh_steps"])
        if backend == "mlx":
            print("[bench] mlx: loss ce vs mlx-lm's own train (LoRA, same batch) ...", flush=True)
            report["mlx_vs_mlx_lm"] = run_worker(
                "psft_plugin.bench.steps_mlx", models["mlx"], json.dumps(setup), "--vs-mlx-lm"
            )
        print(f"[bench] {backend}: log-prob path peak memory ...", flush=True)
        small_grid = args.quick or (backend == "mlx" and models["mlx"] != model)
        report["logprob"] += run_worker("psft_plugin.bench.logprob", backend, *(["--quick"] if small_grid else []))
    report["lm_head"] = lm_head_bench(args.quick, args.out.with_name("lm_head.json"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(logprob_table(report["logprob"]))
    print(f"figures: {args.out}")
    versus = report["mlx_vs_mlx_lm"]
    print(
        f"mlx ({Path(models['mlx']).name}): loss ce {versus['tokens_per_second']['ours']:.0f} tok/s vs mlx_lm "
        f"train {versus['tokens_per_second']['mlx_lm']:.0f} tok/s (CPU time): {versus['ours_over_mlx_lm']:.3f}x"
    )
    print(f"mlx ({Path(models['mlx']).name}): {summary_line(report['summary']['mlx'])}")
    print(summary_line(report["summary"]["torch"]))
    return report


if __name__ == "__main__":
    main()
