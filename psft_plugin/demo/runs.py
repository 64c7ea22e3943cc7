"""The demo's training runs (SFT and PSFT, and DFT when asked) through the real command lines.

torch: ``axolotl train`` with the PSFT plugin (``loss: ce`` vs ``loss: psft``), training the top
8 of SmolLM2's 30 blocks and the final norm. MLX: ``python -m psft_plugin.mlx_train`` with LoRA on the top 8
blocks (or all of a smaller model's). Everything else is equal between the two runs of a backend: data, order, seed,
learning rate, schedule. Each run's per-step metrics are read back as a :class:`History`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from psft_plugin.objectives import LM_HEAD_CHUNK_KEY


@dataclass(frozen=True)
class Recipe:
    """What both runs share. Steps are optimizer steps."""

    steps: int = 24
    micro_batch: int = 4
    learning_rate: float = 2e-4
    refresh_steps: int = 8
    eval_every: int = 8
    eval_rows: int = 16
    score_rows: int = 32
    sequence_len: int = 512
    trained_layers: int = 8
    warmup_steps: int = 2
    lm_head_chunk_size: int = 0  # psft_lm_head_chunk_size of both torch runs (0: full logits)


@dataclass
class History:
    """Per-step series of one run: ``{metric: [(step, value), ...]}``."""

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def add(self, name: str, step: int, value: float) -> None:
        self.series.setdefault(name, []).append((int(step), float(value)))

    def mean(self, name: str) -> float:
        values = [v for _, v in self.series.get(name, [])]
        return sum(values) / len(values) if values else float("nan")


def objective_keys(loss: str, recipe: Recipe) -> dict[str, Any]:
    """``loss`` and, for PSFT only, its keys (both hosts reject ``psft_*`` keys under ``loss: ce``)."""
    return {"loss": loss, **({"psft_refresh_steps": recipe.refresh_steps} if loss == "psft" else {})}


def _chat_dataset(path: Path) -> dict[str, Any]:
    return {
        "path": str(path),
        "ds_type": "json",
        "type": "chat_template",
        "field_messages": "messages",
        "roles_to_train": ["assistant"],
        "split": "train",
    }


def model_layers(model_dir: Path) -> int:
    """Number of transformer blocks, from the model's ``config.json``."""
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def axolotl_config(recipe: Recipe, loss: str, model_dir: Path, train: Path, valid: Path, out_dir: Path) -> dict:
    """An Axolotl YAML (as a dict) for one run; ``loss`` is ``ce``, ``psft`` or ``dft``.

    ``valid`` should hold ``recipe.eval_rows`` rows: Axolotl evaluates the whole file.
    """
    layers = model_layers(model_dir)
    first = max(0, layers - recipe.trained_layers)
    return {
        "base_model": str(model_dir),
        "plugins": ["psft_plugin.integrations.axolotl.PSFTPlugin"],
        **objective_keys(loss, recipe),
        "datasets": [_chat_dataset(train)],
        "test_datasets": [_chat_dataset(valid)],
        "chat_template": "tokenizer_default",
        "dataset_prepared_path": str(out_dir / "prepared"),
        "output_dir": str(out_dir / "model"),
        # Axolotl escapes dots itself and matches anywhere: the top blocks plus the final norm.
        "unfrozen_parameters": [f"model.layers.{i}." for i in range(first, layers)] + ["model.norm"],
        "sequence_len": recipe.sequence_len,
        "sample_packing": False,
        "micro_batch_size": recipe.micro_batch,
        "gradient_accumulation_steps": 1,
        "max_steps": recipe.steps,
        "learning_rate": recipe.learning_rate,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant_with_warmup",
        "warmup_steps": recipe.warmup_steps,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "eval_steps": recipe.eval_every,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": recipe.steps,
        "save_total_limit": 1,
        "fp32": True,
        "bf16": False,
        "seed": 0,
        **({LM_HEAD_CHUNK_KEY: recipe.lm_head_chunk_size} if recipe.lm_head_chunk_size else {}),
    }


def mlx_config(recipe: Recipe, loss: str, model_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    """A ``psft_plugin.mlx_train`` YAML (as a dict) for one run."""
    return {
        "model": str(model_dir),
        "data": str(data_dir),
        "adapter_path": str(out_dir / "adapters"),
        "train": True,
        "fine_tune_type": "lora",
        "num_layers": min(recipe.trained_layers, model_layers(model_dir)),
        "lora_parameters": {"rank": 16, "scale": 20.0, "dropout": 0.0},
        "mask_prompt": True,
        "max_seq_length": recipe.sequence_len,
        "batch_size": recipe.micro_batch,
        "iters": recipe.steps,
        "optimizer": "adamw",
        "lr_schedule": {
            "name": "linear_schedule",
            "arguments": [recipe.learning_rate, recipe.learning_rate, 1],
            "warmup": recipe.warmup_steps,
        }
        if recipe.warmup_steps
        else None,
        "optimizer_config": {"adamw": {"weight_decay": 0.1, "bias_correction": True}},
        "learning_rate": recipe.learning_rate,
        "steps_per_report": 1,
        "steps_per_eval": recipe.eval_every,
        "val_batches": max(1, recipe.eval_rows // recipe.micro_batch),
        "save_every": recipe.steps,
        "seed": 0,
        **objective_keys(loss, recipe),
    }


def launch(command: list[str], config: dict, out_dir: Path) -> None:
    """Write ``config`` as ``out_dir/config.yml`` and run ``command + [that file]``, output shown live."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([*command, str(path)], check=True, env=env)


def torch_history(out_dir: Path) -> History:
    """Metrics from the final checkpoint's ``trainer_state.json`` (Axolotl's log history)."""
    (state,) = sorted((out_dir / "model").glob("checkpoint-*/trainer_state.json"))
    history = History()
    for entry in json.loads(state.read_text())["log_history"]:
        for name in ("psft/nll", "psft/entropy", "psft/clipfrac", "psft/approx_kl"):
            if name in entry:
                history.add(name.split("/")[1], entry["step"], entry[name])
        if "eval_loss" in entry:
            history.add("eval_nll", entry["step"], entry["eval_loss"])
    return history


def mlx_history(out_dir: Path) -> History:
    """Metrics from ``metrics.jsonl`` next to the adapters."""
    history = History()
    for line in (out_dir / "adapters" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "val":
            history.add("eval_nll", row["iteration"], row["val_loss"])
            continue
        for name in ("psft/nll", "psft/entropy", "psft/clipfrac", "psft/approx_kl"):
            if name in row:
                history.add(name.split("/")[1], row["iteration"], row[name])
    return history
