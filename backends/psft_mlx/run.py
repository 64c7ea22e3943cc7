"""Wiring a configuration to :func:`psft_mlx.trainer.train`: model, data, optimizer, outputs.

Everything reusable comes from mlx-lm 0.32.2: ``load``, ``linear_to_lora_layers``, the dataset
formats (text, completions, chat, with ``mask_prompt``), ``iterate_batches``, the optimizers and
``build_schedule``. The outputs are what ``mlx_lm.lora`` writes: ``adapters.safetensors`` (the
trainable parameters: LoRA/DoRA matrices, or the unfrozen weights for ``full``),
``adapter_config.json`` and ``NNNNNNN_adapters.safetensors`` checkpoints, plus ``metrics.jsonl``.
"""

from __future__ import annotations

import itertools
import json
import math
import types
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from psft_mlx.data import RestoredNumpyRandom, first_trainable, iterate_micro_batches
from psft_mlx.trainer import LoopArgs, evaluate_nll, train
from psft_plugin.options import ConfigError
from psft_plugin.registry import get_objective

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
              "adafactor": optim.Adafactor}
ADAPTER_FILE = "adapters.safetensors"
METRICS_FILE = "metrics.jsonl"


def build_optimizer(cfg: types.SimpleNamespace) -> optim.Optimizer:
    """mlx-lm's optimizer and schedule keys; Adam/AdamW get ``bias_correction=True`` (torch's Adam)

    unless ``optimizer_config`` sets it (mlx defaults it to False).
    """
    from mlx_lm.tuner.utils import build_schedule

    kwargs = dict((cfg.optimizer_config or {}).get(cfg.optimizer) or {})
    if cfg.optimizer in ("adam", "adamw"):
        kwargs.setdefault("bias_correction", True)
    try:
        lr = build_schedule(cfg.lr_schedule) if cfg.lr_schedule else cfg.learning_rate
    except (KeyError, TypeError, AttributeError) as error:
        raise ConfigError([f"`lr_schedule: {cfg.lr_schedule}` is invalid ({error!r}); it needs `name` "
                           f"(an mlx.optimizers.schedulers function) and `arguments`"]) from None
    try:
        return OPTIMIZERS[cfg.optimizer](learning_rate=lr, **kwargs)
    except TypeError as error:
        raise ConfigError([f"`optimizer_config.{cfg.optimizer}: {kwargs}` is invalid: {error}"]) from None


def prepare_model(model: nn.Module, cfg: types.SimpleNamespace) -> None:
    """Freeze, then unfreeze the top ``num_layers`` (full) or add LoRA/DoRA there; resume if asked."""
    from mlx_lm.tuner.trainer import grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(cfg.seed)  # the LoRA initialisation
    model.freeze()
    if cfg.num_layers > len(model.layers):
        raise ConfigError([f"`num_layers: {cfg.num_layers}` but the model has {len(model.layers)} layers; "
                           f"use at most {len(model.layers)} (or -1 for all)"])
    if cfg.fine_tune_type == "full":
        for layer in model.layers[-max(cfg.num_layers, 0):]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, cfg.num_layers, cfg.lora_parameters, use_dora=cfg.fine_tune_type == "dora")
    if cfg.resume_adapter_file is not None:
        load_trainable(model, cfg.resume_adapter_file)
    if cfg.grad_checkpoint:
        grad_checkpoint(model.layers[0])


def load_trainable(model: nn.Module, path: str) -> None:
    """Load saved trainable parameters, refusing (all at once) names or shapes that do not fit."""
    weights = mx.load(str(path))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    problems = [f"`resume_adapter_file`: {name} is not a trainable parameter of this model" if name not in trainable
                else f"`resume_adapter_file`: {name} has shape {tuple(w.shape)}, the model's is "
                     f"{tuple(trainable[name].shape)}"
                for name, w in weights.items() if name not in trainable or w.shape != trainable[name].shape]
    if problems:
        raise ConfigError(problems + ["use the fine_tune_type, num_layers and lora_parameters the file was trained with"])
    model.load_weights(list(weights.items()), strict=False)


def load_data(cfg: types.SimpleNamespace, tokenizer: Any) -> tuple[Any, Any, Any]:
    """mlx-lm's train/valid/test datasets (cached), checked for trainable tokens and size."""
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset

    try:
        splits = load_dataset(cfg, tokenizer)
    except ValueError as error:
        raise ConfigError([f"`data: {cfg.data}`: {error}"]) from None
    train_set, valid_set, test_set = (CacheDataset(s) if len(s) else s for s in splits)
    problems = []
    if len(train_set) < cfg.batch_size:
        problems.append(f"the training set has {len(train_set)} examples, fewer than `batch_size: {cfg.batch_size}`")
    elif first_trainable(train_set, cfg.max_seq_length) is None:
        problems.append(f"no training example has a response token within `max_seq_length: {cfg.max_seq_length}` "
                        f"(mask_prompt: {cfg.mask_prompt}); fix the data, raise max_seq_length or turn mask_prompt off")
    for name, split in (("valid", valid_set), ("test", test_set if cfg.test else [])):
        if 0 < len(split) < cfg.batch_size:
            problems.append(f"{name}.jsonl has {len(split)} examples, fewer than `batch_size: {cfg.batch_size}`")
    if cfg.test and len(test_set) == 0:
        problems.append("`test: true` needs a test.jsonl in the data folder")
    if problems:
        raise ConfigError(problems)
    return train_set, valid_set, test_set


def make_evaluate(dataset: Any, cfg: types.SimpleNamespace, num_batches: int) -> Optional[Callable]:
    """Validation NLL over ``num_batches`` micro-batches (-1: all); None without data.

    The global NumPy RNG that mlx-lm's batching uses is restored afterwards, so evaluating
    does not change the training order.
    """
    if not len(dataset):
        return None

    def evaluate(model: nn.Module) -> float:
        with RestoredNumpyRandom():
            batches = iterate_micro_batches(dataset, cfg.batch_size, cfg.max_seq_length, loop=False, seed=cfg.seed)
            return evaluate_nll(model, batches if num_batches == -1 else itertools.islice(batches, num_batches))

    return evaluate


def adapter_config(cfg: types.SimpleNamespace) -> dict[str, Any]:
    """What ``mlx_lm.load(adapter_path=...)`` reads (fine_tune_type, num_layers, lora_parameters) and the run's keys."""
    config = {k: v for k, v in vars(cfg).items() if k not in ("objective", "psft", "notes")}
    config.update(cfg.psft)
    if cfg.fine_tune_type == "full":
        config["lora_parameters"] = None  # as mlx_lm.lora writes it
    return config


def save_trainable(model: nn.Module, path: Path) -> None:
    """The trainable parameters, flattened, as safetensors (mlx-lm's adapter format)."""
    mx.save_safetensors(str(path), dict(tree_flatten(model.trainable_parameters())))


def make_save(model: nn.Module, adapter_dir: Path, announce: Callable[[str], None]) -> Callable[[int], None]:
    """Checkpoint function: ``adapters.safetensors`` plus ``{step:07d}_adapters.safetensors``."""

    def save(step: int) -> None:
        save_trainable(model, adapter_dir / ADAPTER_FILE)
        checkpoint = adapter_dir / f"{step:07d}_{ADAPTER_FILE}"
        save_trainable(model, checkpoint)
        announce(f"Iter {step}: saved {checkpoint}")

    return save


def loop_args(cfg: types.SimpleNamespace) -> LoopArgs:
    """The loop's schedule from the configuration."""
    return LoopArgs(iters=cfg.iters, grad_accumulation_steps=cfg.grad_accumulation_steps,
                    steps_per_report=cfg.steps_per_report, steps_per_eval=cfg.steps_per_eval,
                    save_every=cfg.save_every, clear_cache_threshold=cfg.clear_cache_threshold,
                    compile=cfg.compile if cfg.compile is not None else mx.default_device() == mx.gpu)


def run(cfg: types.SimpleNamespace, callback: Any = None, log: Callable[[str], None] = print) -> list[dict]:
    """Load, train, save; return the per-step records. ``callback`` defaults to print + metrics.jsonl."""
    from mlx_lm.utils import load

    for note in cfg.notes:
        log(note)
    np.random.seed(cfg.seed)
    log(f"Loading {cfg.model}")
    model, tokenizer = load(cfg.model, tokenizer_config={"trust_remote_code": cfg.trust_remote_code},
                            trust_remote_code=cfg.trust_remote_code)
    train_set, valid_set, test_set = load_data(cfg, tokenizer)
    prepare_model(model, cfg)
    optimizer = build_optimizer(cfg)
    adapter_dir = Path(cfg.adapter_path)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config(cfg), indent=2, sort_keys=True))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    log(f"Training {trainable / 1e6:.3f}M parameters ({cfg.fine_tune_type}) with loss `{cfg.loss}` "
        f"{cfg.psft}; writing to {adapter_dir}")
    if callback is None:
        callback = ReportCallback(adapter_dir / METRICS_FILE, log)
    batches = iterate_micro_batches(train_set, cfg.batch_size, cfg.max_seq_length, loop=True, seed=cfg.seed)
    records = train(model, optimizer, batches, cfg.objective, cfg.psft, loop_args(cfg), callback=callback,
                    evaluate=make_evaluate(valid_set, cfg, cfg.val_batches),
                    save=make_save(model, adapter_dir, log), warmup_objective=get_objective("ce"))
    save_trainable(model, adapter_dir / ADAPTER_FILE)
    log(f"Saved final weights to {adapter_dir / ADAPTER_FILE}")
    if cfg.test:
        test_nll = make_evaluate(test_set, cfg, cfg.test_batches)(model)
        log(f"Test NLL {test_nll:.4f}, test ppl {math.exp(test_nll):.3f}")
    return records


class ReportCallback:
    """Prints each report and appends it (and each validation) as a JSON line to ``path``."""

    def __init__(self, path: Path, log: Callable[[str], None] = print):
        self.path, self.log = Path(path), log
        self.path.write_text("")

    def _append(self, kind: str, info: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"kind": kind, **info}) + "\n")

    def on_train_loss_report(self, info: dict) -> None:
        self._append("train", info)
        self.log(format_report(info))

    def on_val_loss_report(self, info: dict) -> None:
        self._append("val", info)
        self.log(f"Iter {info['iteration']}: val NLL {info['val_loss']:.4f} ({info['val_time']:.2f} s)")


def format_report(info: dict) -> str:
    """One progress line: loss, the psft/* metrics present, lr, tokens/s, peak memory."""
    parts = [f"Iter {info['iteration']}: loss {info['train_loss']:.4f}"]
    for name in ("nll", "clipfrac", "ratio_mean", "ratio_min", "ratio_max", "approx_kl", "entropy"):
        if f"psft/{name}" in info:
            parts.append(f"{name} {info[f'psft/{name}']:.4g}")
    parts += [f"lr {info['learning_rate']:.3g}", f"{info['tokens_per_second']:.0f} tok/s",
              f"peak mem {info['peak_memory']:.3f} GB"]
    return " | ".join(parts)
