"""Run the real ``swift sft`` / ``psft-swift sft`` on the tiny model, two runs at a time, and read the results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
# Offline. ms-swift lists a ModelScope repository while it loads the data, and the hub client
# retries a failed listing 4 times (7 s of back-off per run): one attempt is enough offline.
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1",
}


def tiny_flags(model_dir: Path, data_dir: Path, out: Path, **overrides: object) -> list[str]:
    """The shared ``swift sft`` flags for the tiny model (full fine-tuning, SGD, GA 2, 4 optimizer steps)."""
    values: dict[str, object] = {
        "model": model_dir,
        "model_type": "llama",
        "template": "chatml",
        "use_hf": "true",
        "torch_dtype": "float32",
        "dataset": data_dir / "train.jsonl",
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
        "split_dataset_ratio": 0,
        "report_to": "none",
        "tuner_type": "full",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        # Plain SGD: a weight difference is the gradient difference itself (Adam's normalisation
        # would blow float noise in near-zero gradients up to the learning rate).
        "optim": "sgd",
        "learning_rate": 0.5,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0,
        "max_grad_norm": 0,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1000,
        "save_only_model": "true",
        "add_version": "false",
        "seed": 0,
        "data_seed": 0,
        "output_dir": out,
    }
    values.update(overrides)
    return [item for key, value in values.items() if value is not None for item in (f"--{key}", str(value))]


@dataclass
class Run:
    """A finished run: its output directory, console output and exit code."""

    name: str
    out: Path
    output: str
    returncode: int

    def check(self) -> "Run":
        assert self.returncode == 0, f"{self.name} failed:\n{self.output[-6000:]}"
        return self

    def logs(self) -> list[dict]:
        """``logging.jsonl``'s training lines (one per optimizer step)."""
        lines = [json.loads(line) for line in (self.out / "logging.jsonl").read_text().splitlines()]
        return [line for line in lines if "loss" in line and "train_runtime" not in line]

    def eval_losses(self) -> list[float]:
        """``eval_loss`` of each evaluation in ``logging.jsonl``."""
        lines = [json.loads(line) for line in (self.out / "logging.jsonl").read_text().splitlines()]
        return [line["eval_loss"] for line in lines if "eval_loss" in line]

    def weights(self) -> dict[str, torch.Tensor]:
        """The saved full model or LoRA adapter (the last checkpoint)."""
        checkpoint = max(self.out.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
        files = list(checkpoint.glob("adapter_model.safetensors")) or list(checkpoint.glob("model*.safetensors"))
        assert files, f"{self.name}: no weights in {checkpoint}"
        return {key: value for path in files for key, value in load_file(path).items()}


def run(name: str, command: list[str], out: Path, env: Optional[dict[str, str]] = None) -> Run:
    """``command`` (``swift sft ...`` or ``psft-swift sft ...``) in a subprocess, from the venv's bin."""
    out.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **ENV, **(env or {}))
    start = time.perf_counter()
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=out.parent, env=full_env, capture_output=True, text=True, timeout=600
    )
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return Run(name, out, done.stdout + done.stderr, done.returncode)
