"""The real ``axolotl train`` runs of the GPU check (items 1 and 4 of :mod:`psft_plugin.bench.gpu`).

Every run is a subprocess of ``axolotl train cfg.yml`` (``--launcher python``, or ``torchrun``
for several processes), its per-step log lines parsed from its output and its final weights read
from its output directory. Runs are launched two at a time (:func:`run_all`); timings are not
taken from them.

**Tolerances.** ``loss: psft`` with K = 1 and ``loss: ce`` compute the same gradient in exact
arithmetic (r = 1 at every step; docs/objective.md section 1), by a different order of float32
operations (per-token −log p weighted by r against the model's summed cross-entropy), and CUDA's
attention backward kernels are not deterministic. With unit roundoff ``u`` of the training dtype
(2^-8 for bf16, whose 8 significant bits store activations, gradients and — under ``bf16: true``
— the base weights; 2^-24 for float32), such differences start at about one rounding of an
element and are carried on by training:

- the ``psft/nll`` trajectory: relative difference at each step at most ``NLL_ROUNDINGS · u``
  (each step's NLL is a mean of O(1) terms from logits a few roundings apart);
- the final trained weights: ``|w_k1 − w_ce| / |w_ce − w_0|`` (Frobenius over all trained tensors,
  ``w_0`` the shared starting adapter) at most ``steps · u``: Adam normalises each element's step,
  so a gradient one rounding off moves it about ``u`` relatively, and ``steps`` such steps add up
  at worst linearly.

A wrong objective differs by far more: the report gives the K = 8 run's distance from CE beside
the tolerance (the control), so a reader sees that the tolerance separates the two. On CUDA a
second CE run gives the floor: how far two runs of the same objective drift apart by
non-deterministic kernels alone.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

PLUGIN = "psft_plugin.integrations.axolotl.PSFTPlugin"
LOG_LINE = re.compile(r"\{'loss': .*?\}")
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float32": 2.0**-24}
NLL_ROUNDINGS = 4
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Lane:
    """What the runs of one check share: device, dtype, model, data and recipe."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32" or "bfloat16"
    model_dir: Path
    data_dir: Path
    steps: int
    micro_batch: int
    sequence_len: int
    learning_rate: float
    refresh_steps: int = 8


@dataclass
class Run:
    """A finished ``axolotl train``: name, output directory, combined output, exit code, seconds."""

    name: str
    output_dir: Path
    output: str
    returncode: int
    seconds: float

    def steps(self) -> list[dict[str, float]]:
        """The per-step log dicts (``logging_steps: 1``), rank 0's."""
        return [
            {key: float(value) for key, value in ast.literal_eval(line).items()}
            for line in LOG_LINE.findall(self.output)
        ]

    def failure(self) -> str:
        """ "" for a clean run, else the exit code and the tail of its output."""
        return "" if self.returncode == 0 else f"exit {self.returncode}:\n{self.output[-3000:]}"


def tolerances(lane: Lane) -> dict[str, float]:
    """The relative tolerances of K = 1 against CE in ``lane``'s dtype (module docstring)."""
    u = UNIT_ROUNDOFF[lane.dtype]
    return {"unit_roundoff": u, "nll": NLL_ROUNDINGS * u, "update": lane.steps * u}


def attention(lane: Lane) -> str:
    """``flash_attention_2`` on CUDA where ``flash_attn`` is installed, else ``sdpa``."""
    import importlib.util

    if lane.device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def config(lane: Lane, out: Path, loss: str, attn: str = "sdpa", lora: bool = True, **overrides: Any) -> dict[str, Any]:
    """An Axolotl config for one run in ``out``: LoRA (dropout 0; ``lora=False``: full fine-tuning),
    constant lr, sequential data."""
    dataset = {"path": str(lane.data_dir / "train.jsonl"), "ds_type": "json", "type": "chat_template"}
    dataset.update(field_messages="messages", roles_to_train=["assistant"])
    cfg: dict[str, Any] = {
        "base_model": str(lane.model_dir),
        "plugins": [PLUGIN],
        "loss": loss,
        **({"psft_refresh_steps": lane.refresh_steps} if loss == "psft" else {}),
        "datasets": [dataset],
        "chat_template": "tokenizer_default",
        "dataset_prepared_path": str(out / "prepared"),
        "dataset_num_proc": 1,
        "val_set_size": 0,
        "output_dir": str(out / "out"),
        "attn_implementation": attn,
        "sequence_len": lane.sequence_len,
        "sample_packing": False,
        "curriculum_sampling": True,
        "micro_batch_size": lane.micro_batch,
        "gradient_accumulation_steps": 1,
        "max_steps": lane.steps,
        "learning_rate": lane.learning_rate,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": lane.dtype == "bfloat16",
        "fp32": lane.dtype == "float32",
    }
    if lane.dtype == "float32":  # the float32 tolerances assume full float32 matmuls (Axolotl's tf32 is "auto")
        cfg["tf32"] = False
    if lora:  # dropout makes r != 1 right after a refresh (docs/axolotl.md)
        cfg.update(adapter="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=LORA_TARGETS)
    if lora and lane.device == "cpu":  # Axolotl's Triton LoRA kernels want CUDA
        cfg.update({f"lora_{part}_kernel": False for part in ("mlp", "qkv", "o", "embedding")})
    cfg.update(overrides)
    return cfg


def start_adapter(lane: Lane, out: Path) -> Path:
    """A saved LoRA adapter with random non-zero A and B (seeded), shared by the compared runs.

    Axolotl's own LoRA initialisation differs from run to run; starting every run from this one
    makes the final weights comparable and gives the update ``w - w_0`` to measure against.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # rebuilt every time: the folder may hold another model's adapter
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(lane.model_dir, dtype=torch.float32),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    model.save_pretrained(out)
    return out


def launch(out: Path, cfg: dict[str, Any], processes: int = 1, env: Optional[dict[str, str]] = None) -> Run:
    """``axolotl train out/cfg.yml`` (``torchrun`` for ``processes`` > 1), its output kept in
    ``out/train.log``; never raises on failure."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    binary = Path(sys.executable).parent  # `axolotl train` re-executes through `accelerate` on PATH
    full_env = {**os.environ, "PATH": f"{binary}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    full_env.update(AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [str(binary / "axolotl"), "train", str(path)]
    if processes > 1:
        command += ["--launcher", "torchrun", "--", "--standalone", f"--nproc_per_node={processes}"]
    else:
        command += ["--launcher", "python"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=out, env=full_env, capture_output=True, text=True, timeout=420)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as timeout:
        output, code = f"timed out after {timeout.timeout} s", 124
    (out / "train.log").write_text(output)
    return Run(out.name, out / "out", output, code, time.perf_counter() - start)


def run_all(jobs: dict[str, tuple[Path, dict, int, Optional[dict]]], workers: int = 2) -> dict[str, Run]:
    """Launch ``{name: (dir, cfg, processes, env)}`` ``workers`` at a time; every run, by name."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(launch, *job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def load_weights(directory: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return {key: value.double() for key, value in load_file(str(directory / name)).items()}


def relative_update_difference(a: dict, b: dict, start: dict) -> float:
    """``|a - b| / |b - start|`` over all tensors of ``b`` (Frobenius norms)."""
    diff = math.sqrt(sum(float((a[key] - b[key]).pow(2).sum()) for key in b))
    update = math.sqrt(sum(float((b[key] - start[key]).pow(2).sum()) for key in b))
    return diff / update if update else math.inf


def max_abs_difference(a: dict, b: dict) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in b)


def nll_difference(a: Run, b: Run) -> float:
    """Largest relative difference of ``psft/nll`` at the same step; inf if the step counts differ."""
    x, y = [step["psft/nll"] for step in a.steps()], [step["psft/nll"] for step in b.steps()]
    if not x or len(x) != len(y):
        return math.inf
    return max(abs(p - q) / abs(q) for p, q in zip(x, y))


def window_clipping(run: Run, refresh_steps: int) -> dict[str, Any]:
    """Clip fractions by window: each window's first step (r = 1 exactly) and the most of its later steps."""
    clipfrac = [step.get("psft/clipfrac", math.nan) for step in run.steps()]
    windows = [clipfrac[i : i + refresh_steps] for i in range(0, len(clipfrac), refresh_steps)]
    return {
        "first_steps": [window[0] for window in windows],
        "later_max": [max(window[1:]) if len(window) > 1 else math.nan for window in windows],
    }


def fresh_steps(run: Run) -> bool:
    """Every logged step has r = 1 exactly (what K = 1 must give)."""
    return all(step.get("psft/ratio_min") == step.get("psft/ratio_max") == 1.0 for step in run.steps())


def compare_to_ce(lane: Lane, ce: Run, k1: Run, start: dict) -> dict[str, Any]:
    """``psft/nll`` trajectory and final-adapter distance of a K = 1 run from a CE run, with the verdict."""
    name = "adapter_model.safetensors"
    figures = {
        "steps": [len(ce.steps()), len(k1.steps())],
        "nll_rel_diff": nll_difference(k1, ce),
        "update_rel_diff": relative_update_difference(
            load_weights(k1.output_dir, name), load_weights(ce.output_dir, name), start
        ),
        "k1_fresh_every_step": fresh_steps(k1),
    }
    tol = tolerances(lane)
    figures["ok"] = (
        figures["steps"] == [lane.steps, lane.steps]
        and figures["nll_rel_diff"] <= tol["nll"]
        and figures["update_rel_diff"] <= tol["update"]
        and figures["k1_fresh_every_step"]
    )
    return figures


def judge_packed(lane: Lane, k8: Run) -> dict[str, Any]:
    """K = 8 with ``sample_packing: true``: clip fraction 0 on each window's first step, > 0 later."""
    clipping = window_clipping(k8, lane.refresh_steps)
    clipping["steps"] = len(k8.steps())
    clipping["ok"] = (
        clipping["steps"] == lane.steps
        and all(first == 0.0 for first in clipping["first_steps"])
        and all(later > 0.0 for later in clipping["later_max"])
    )
    return clipping


def correctness_jobs(lane: Lane, root: Path, env: Optional[dict[str, str]]) -> tuple[dict, list[str], Path]:
    """The runs of item 1: CE and K = 1 per attention kernel, K = 8 packed; and the start adapter."""
    adapter = start_adapter(lane, root / "start_adapter")
    kernels = list(dict.fromkeys(["sdpa", attention(lane)]))
    start = {"lora_model_dir": str(adapter)}
    jobs: dict[str, tuple] = {}
    for attn in kernels:
        for name, loss, extra in (("ce", "ce", {}), ("k1", "psft", {"psft_refresh_steps": 1})):
            out = root / f"{name}-{attn}"
            jobs[f"{name}-{attn}"] = (out, config(lane, out, loss, attn, **start, **extra), 1, env)
    out = root / "k8-packed"
    jobs["k8-packed"] = (out, config(lane, out, "psft", attention(lane), **start, sample_packing=True), 1, env)
    if lane.device == "cuda":  # the floor: CE against itself, apart only by non-deterministic kernels
        out = root / "ce-rerun"
        jobs["ce-rerun"] = (out, config(lane, out, "ce", attention(lane), **start), 1, env)
    return jobs, kernels, adapter


def correctness(lane: Lane, root: Path, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Item 1: runs them all, compares, and returns the measured figures with ``ok`` and a verdict."""
    jobs, kernels, adapter = correctness_jobs(lane, root, env)
    runs = run_all(jobs)
    failed = {name: run.failure() for name, run in runs.items() if run.failure()}
    result: dict[str, Any] = {"tolerance": tolerances(lane), "attention": kernels, "failed_runs": failed}
    result["run_seconds"] = {name: round(run.seconds, 1) for name, run in runs.items()}
    if failed:
        result.update(ok=False, verdict=f"axolotl train failed: {', '.join(failed)} (see report.json)")
        return result
    start = load_weights(adapter, "adapter_model.safetensors")
    result["k1_vs_ce"] = {attn: compare_to_ce(lane, runs[f"ce-{attn}"], runs[f"k1-{attn}"], start) for attn in kernels}
    result["k8_packed"] = judge_packed(lane, runs["k8-packed"])
    name = "adapter_model.safetensors"
    ce_weights = load_weights(runs[f"ce-{attention(lane)}"].output_dir, name)
    result["control_k8_vs_ce_update_rel_diff"] = relative_update_difference(
        load_weights(runs["k8-packed"].output_dir, name), ce_weights, start
    )
    if "ce-rerun" in runs:
        floor = compare_to_ce(lane, runs[f"ce-{attention(lane)}"], runs["ce-rerun"], start)
        result["floor_ce_rerun"] = {key: floor[key] for key in ("nll_rel_diff", "update_rel_diff")}
    result["ok"] = all(pair["ok"] for pair in result["k1_vs_ce"].values()) and result["k8_packed"]["ok"]
    result["verdict"] = correctness_verdict(result)
    return result


def correctness_verdict(result: dict[str, Any]) -> str:
    """One line: each K = 1 vs CE pair against the tolerances, the K = 8 window clipping, the control."""
    tol = result["tolerance"]
    pairs = "; ".join(
        f"K=1 vs CE ({attn}): nll {pair['nll_rel_diff']:.1e} (tol {tol['nll']:.1e}), "
        f"weights {pair['update_rel_diff']:.1e} (tol {tol['update']:.1e})"
        for attn, pair in result["k1_vs_ce"].items()
    )
    packed, floor = result["k8_packed"], result.get("floor_ce_rerun")
    return (
        f"{pairs}; K=8 packed: clipfrac at window starts {packed['first_steps']}, "
        f"max later {[round(x, 4) for x in packed['later_max']]}; "
        f"control K=8 vs CE weights {result['control_k8_vs_ce_update_rel_diff']:.1e}"
        + (f"; floor CE rerun nll {floor['nll_rel_diff']:.1e}, weights {floor['update_rel_diff']:.1e}" if floor else "")
    )


FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "offload_params": False,
        "state_dict_type": "FULL_STATE_DICT",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "reshard_after_forward": True,
    },
}
ZERO3 = {  # every parameter sharded (the default persistence threshold would keep a tiny model whole)
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}
MULTI_TOLERANCE = {"k1_vs_ce": 1e-5, "two_vs_one": 5e-5}  # float32, as the CPU engine tests (docs/axolotl.md)


def multi_gpu_jobs(lane: Lane, root: Path) -> dict[str, tuple]:
    """FSDP2 and ZeRO-3 (CE and K = 1, 2 processes), and K = 2 on 1 process (micro-batch 2) vs 2 (micro-batch 1)."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    (root / "zero3.json").write_text(json.dumps(ZERO3))
    engines = {"fsdp2": FSDP2, "zero3": {"deepspeed": str(root / "zero3.json")}}
    common = {"gradient_accumulation_steps": 2, "micro_batch_size": 1}
    jobs: dict[str, tuple] = {}
    for engine, settings in engines.items():
        for name, loss, extra in (("ce", "ce", {}), ("k1", "psft", {"psft_refresh_steps": 1})):
            out = root / f"{engine}-{name}"
            jobs[f"{engine}-{name}"] = (
                out,
                config(lane, out, loss, lora=False, **common, **settings, **extra),
                2,
                None,
            )
    for name, processes in (("one-k2", 1), ("two-k2", 2)):
        out = root / name
        cfg = config(
            lane, out, "psft", lora=False, **{**common, "micro_batch_size": 3 - processes}, psft_refresh_steps=2
        )
        jobs[name] = (out, cfg, processes, None)
    return jobs


def multi_gpu(lane: Lane, root: Path) -> dict[str, Any]:
    """Item 4 on 2+ CUDA devices over NCCL: the distances of the final weights, against float32 tolerances."""
    runs = run_all(multi_gpu_jobs(lane, root))
    failed = {name: run.failure() for name, run in runs.items() if run.failure()}
    result: dict[str, Any] = {"tolerance": MULTI_TOLERANCE, "failed_runs": failed}
    result["run_seconds"] = {name: round(run.seconds, 1) for name, run in runs.items()}
    if failed:
        result.update(ok=False, verdict=f"axolotl train failed: {', '.join(failed)} (see report.json)")
        return result

    def weights(name: str) -> dict:
        return load_weights(runs[name].output_dir, "model.safetensors")

    result["max_abs_diff"] = {
        **{f"{e} K=1 vs CE": max_abs_difference(weights(f"{e}-k1"), weights(f"{e}-ce")) for e in ("fsdp2", "zero3")},
        "2 processes vs 1 (K=2)": max_abs_difference(weights("two-k2"), weights("one-k2")),
    }
    limits = [MULTI_TOLERANCE["k1_vs_ce"]] * 2 + [MULTI_TOLERANCE["two_vs_one"]]
    result["ok"] = all(diff <= limit for diff, limit in zip(result["max_abs_diff"].values(), limits))
    result["verdict"] = "; ".join(
        f"{key}: max |dw| {diff:.1e} (tol {limit:.0e})"
        for (key, diff), limit in zip(result["max_abs_diff"].items(), limits)
    )
    return result
