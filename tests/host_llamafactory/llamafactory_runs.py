"""Run ``psft-llamafactory train`` and ``llamafactory-cli train`` on the tiny model, two at a time.

Every run writes its YAML (:func:`config`: the tiny Llama, its chat data registered in a
``dataset_info.json``, per-run overrides) into its own directory and runs the real CLI in a
subprocess, with its own datasets cache. Several processes: ``FORCE_TORCHRUN=1 NPROC_PER_NODE=N``,
as a LLaMA-Factory user starts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import cli_runs
import yaml

BIN = Path(sys.executable).parent
DATASET = "tiny"
BASE = dict(
    stage="sft",
    do_train=True,
    finetuning_type="full",
    dataset=DATASET,
    template="default",  # the tiny tokenizer has no ChatML tokens
    cutoff_len=128,
    overwrite_cache=True,
    preprocessing_num_workers=1,
    dataloader_num_workers=0,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    learning_rate=1.0e-3,
    lr_scheduler_type="constant",
    max_steps=4,
    logging_steps=1,
    save_strategy="no",
    plot_loss=False,
    overwrite_output_dir=True,
    report_to="none",
    seed=0,
)


def register_dataset(data_dir: Path) -> Path:
    """Write ``dataset_info.json`` naming ``train.jsonl`` (``tiny``) and ``valid.jsonl`` (``tiny_valid``)."""
    columns = {"messages": "messages"}
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    info = {
        name: {"file_name": file, "formatting": "sharegpt", "columns": columns, "tags": tags}
        for name, file in ((DATASET, "train.jsonl"), (f"{DATASET}_valid", "valid.jsonl"))
    }
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return data_dir


def config(model_dir: Path, data_dir: Path, directory: Path, **overrides: Any) -> dict:
    """The tiny run's YAML mapping with ``overrides`` (a ``None`` value removes the key)."""
    cfg = dict(BASE, model_name_or_path=str(model_dir), dataset_dir=str(data_dir), output_dir=str(directory / "out"))
    cfg.update(overrides)
    return {key: value for key, value in cfg.items() if value is not None}


class Run(cli_runs.Run):
    """A finished ``psft-llamafactory`` / ``llamafactory-cli`` run, with LLaMA-Factory's own log."""

    def trainer_log(self) -> list[dict[str, Any]]:
        """LLaMA-Factory's ``trainer_log.jsonl`` (one line per log), in order."""
        lines = (self.output_dir / "trainer_log.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


def train(
    directory: Path,
    cfg: dict,
    cli: str = "psft-llamafactory",
    processes: int = 1,
    name: str = "",
    env: Optional[dict[str, str]] = None,
) -> Run:
    """``CLI train cfg.yaml`` in a subprocess; ``processes`` > 1 through ``FORCE_TORCHRUN``; ``env`` added."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(
        os.environ,
        **(env or {}),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # LLaMA-Factory re-executes the bare `torchrun`
        HF_DATASETS_CACHE=str(directory / "datasets-cache"),
        DISABLE_VERSION_CHECK="1",  # for llamafactory-cli: this venv's datasets is newer than its pin
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
    )
    if processes > 1:
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(processes), ACCELERATE_USE_CPU="true")
    start = time.perf_counter()
    done = subprocess.run(
        [str(BIN / cli), "train", str(path)], cwd=directory, env=env, capture_output=True, text=True, timeout=600
    )
    print(f"{cli} train {name or directory.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return Run(name or directory.name, directory, done.stdout + done.stderr, done.returncode)
