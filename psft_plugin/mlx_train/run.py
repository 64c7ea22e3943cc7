"""The MLX host's run around :func:`psft_mlx.trainer.train`: model, data, optimizer, outputs.

Everything reusable comes from mlx-lm 0.32.2: ``load``, ``linear_to_lora_layers``, the dataset
formats (text, completions, chat, with ``mask_prompt``), ``iterate_batches``, the optimizers,
``build_schedule``, ``load_adapters``, the reporting callbacks (W&B, SwanLab) and the console
pieces. The outputs are what ``mlx_lm.lora`` writes: ``adapters.safetensors`` (the trainable
parameters: LoRA/DoRA matrices, or the unfrozen weights for ``full``), ``adapter_config.json``
and ``NNNNNNN_adapters.safetensors`` checkpoints, plus ``metrics.jsonl`` and, next to each
adapters file, the optimizer state that ``resume_adapter_file`` continues from.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from psft_mlx.data import RestoredNumpyRandom, first_trainable, iterate_micro_batches
from psft_mlx.trainer import LoopArgs, evaluate_nll, train
from psft_plugin.mlx_train.checks import OPTIMIZER_CLASSES
from psft_plugin.mlx_train.config import num_layers_problem
from psft_plugin.mlx_train.console import TrainConsole, note
from psft_plugin.options import ConfigError
from psft_plugin.registry import get_objective

ADAPTER_FILE = "adapters.safetensors"
METRICS_FILE = "metrics.jsonl"


def build_optimizer(cfg: types.SimpleNamespace) -> optim.Optimizer:
    """mlx-lm's optimizer and schedule keys, as ``mlx_lm.lora`` builds them (MLX's defaults:

    Adam/AdamW without ``bias_correction`` unless ``optimizer_config`` sets it).
    """
    from mlx_lm.tuner.utils import build_schedule

    kwargs = dict((cfg.optimizer_config or {}).get(cfg.optimizer) or {})
    lr = build_schedule(cfg.lr_schedule) if cfg.lr_schedule else cfg.learning_rate
    try:
        return getattr(optim, OPTIMIZER_CLASSES[cfg.optimizer])(learning_rate=lr, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError([f"`optimizer_config.{cfg.optimizer}: {kwargs}` is invalid: {error}"]) from None


def _download_failed(key: str, name: str, error: Exception) -> ConfigError:
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return ConfigError(
        [
            f"`{key}: {name}` is not a local folder, so it was taken as a Hugging Face id, and "
            f"fetching it failed ({reason[:300]}); check the path (relative to the current directory), "
            f"or download it first while online"
        ]
    )


def load_model(cfg: types.SimpleNamespace) -> tuple[nn.Module, Any]:
    """``mlx_lm.load``; a model that is not a local folder and cannot be fetched is a configuration error."""
    from mlx_lm.utils import load

    try:
        return load(
            cfg.model,
            tokenizer_config={"trust_remote_code": cfg.trust_remote_code},
            trust_remote_code=cfg.trust_remote_code,
        )
    except Exception as error:  # noqa: BLE001 - a hub id: any download failure means the same to the user
        if Path(cfg.model).expanduser().is_dir():
            raise
        raise _download_failed("model", cfg.model, error) from None


def prepare_model(model: nn.Module, cfg: types.SimpleNamespace) -> None:
    """Freeze, then unfreeze the top ``num_layers`` (full) or add LoRA/DoRA there, seeded as mlx-lm does."""
    from mlx_lm.tuner.trainer import grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(cfg.seed)  # the LoRA initialisation
    model.freeze()
    if problem := num_layers_problem(cfg.num_layers, len(model.layers)):  # a hub model: not checked before
        raise ConfigError([problem])
    if cfg.fine_tune_type == "full":
        for layer in model.layers[-max(cfg.num_layers, 0) :]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, cfg.num_layers, cfg.lora_parameters, use_dora=cfg.fine_tune_type == "dora")
    if cfg.grad_checkpoint:
        grad_checkpoint(model.layers[0])


def load_trainable(model: nn.Module, path: str) -> None:
    """Load saved trainable parameters, refusing (all at once) names or shapes that do not fit."""
    weights = mx.load(str(path))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    problems = [
        f"`resume_adapter_file`: {name} is not a trainable parameter of this model"
        if name not in trainable
        else f"`resume_adapter_file`: {name} has shape {tuple(w.shape)}, the model's is {tuple(trainable[name].shape)}"
        for name, w in weights.items()
        if name not in trainable or w.shape != trainable[name].shape
    ]
    if problems:
        raise ConfigError(
            problems + ["use the fine_tune_type, num_layers and lora_parameters the file was trained with"]
        )
    model.load_weights(list(weights.items()), strict=False)


def optimizer_file(adapter_file: Path) -> Path:
    """Where the optimizer state of ``[NNNNNNN_]adapters.safetensors`` is kept: ``[NNNNNNN_]optimizer.safetensors``."""
    adapter_file = Path(adapter_file)
    return adapter_file.with_name(adapter_file.name.replace("adapters.safetensors", "optimizer.safetensors"))


@dataclass(frozen=True)
class Start:
    """Where a run starts: iterations and response tokens already trained (both 0 unless resumed)."""

    iteration: int = 0
    tokens: float = 0.0


def save_checkpoint(model: nn.Module, optimizer: optim.Optimizer, path: Path, trained: Start, name: str) -> None:
    """The trainable parameters (mlx-lm's adapter format) and, beside them, the optimizer state.

    ``trained`` (iterations and response tokens trained) and the optimizer ``name`` go into the
    state file's metadata, for a resume to continue the counters.
    """
    mx.save_safetensors(str(path), dict(tree_flatten(model.trainable_parameters())))
    metadata = {"iteration": str(trained.iteration), "trained_tokens": str(trained.tokens), "optimizer": name}
    mx.save_safetensors(str(optimizer_file(path)), dict(tree_flatten(optimizer.state)), metadata=metadata)


def resume(
    model: nn.Module, optimizer: optim.Optimizer, cfg: types.SimpleNamespace, log: Callable[[str], None]
) -> Start:
    """Load ``resume_adapter_file`` and, if saved beside it, the optimizer state; what was trained already.

    As in ``mlx_lm.lora``, the run then trains ``iters`` more iterations; the iteration numbers,
    checkpoints and ``trained_tokens`` continue from the saved ones. Without a state file (an
    ``mlx_lm.lora`` adapter) the optimizer starts afresh, as in ``mlx_lm.lora``, the iteration
    is read from a ``NNNNNNN_adapters.safetensors`` name and the tokens count from 0.
    """
    path = Path(cfg.resume_adapter_file).expanduser()
    load_trainable(model, path)
    state_file, ga = optimizer_file(path), cfg.grad_accumulation_steps
    metadata = mx.load(str(state_file), return_metadata=True)[1] if state_file.is_file() and state_file != path else {}
    if metadata.get("optimizer") == cfg.optimizer:
        optimizer.state = tree_unflatten(list(mx.load(str(state_file)).items()))
        start = Start(int(metadata["iteration"]), float(metadata.get("trained_tokens", 0.0)))
    else:
        match = re.match(r"(\d+)_adapters\.safetensors$", path.name)
        start = Start(int(match.group(1)) - int(match.group(1)) % ga if match else 0)
        note(log, f"no `{cfg.optimizer}` state saved next to {path}: the optimizer starts afresh (as in mlx_lm.lora)")
    note(
        log,
        f"resuming from {path} at iteration {start.iteration}: training `iters: {cfg.iters}` more iterations, "
        f"to {start.iteration + cfg.iters}, as mlx_lm.lora counts them; the iteration numbers, checkpoints, "
        f"metrics.jsonl and trained_tokens ({start.tokens:,.0f}) continue",
    )
    return start


def _splits(cfg: types.SimpleNamespace, tokenizer: Any) -> tuple[Any, Any, Any]:
    """mlx-lm's ``load_dataset``; a data id that cannot be fetched is a configuration error."""
    from mlx_lm.tuner.datasets import load_dataset

    local = cfg.hf_dataset is None and Path(cfg.data).expanduser().is_dir()
    try:
        return load_dataset(cfg, tokenizer)
    except Exception as error:  # noqa: BLE001 - from a hub id, any fetch failure means the same to the user
        if not local:
            key, name = ("data", cfg.data) if cfg.hf_dataset is None else ("hf_dataset", cfg.hf_dataset)
            raise _download_failed(key, name, error) from None
        if isinstance(error, ValueError):  # mlx-lm's "Unsupported data format" and the like
            raise ConfigError([f"`data: {cfg.data}`: {error}"]) from None
        raise


def load_data(cfg: types.SimpleNamespace, tokenizer: Any) -> tuple[Any, Any, Any]:
    """mlx-lm's train/valid/test datasets (cached), checked for trainable tokens and size."""
    from mlx_lm.tuner.datasets import CacheDataset

    train_set, valid_set, test_set = (CacheDataset(s) if len(s) else s for s in _splits(cfg, tokenizer))
    problems = []
    if cfg.train and len(train_set) < cfg.batch_size:
        problems.append(f"the training set has {len(train_set)} examples, fewer than `batch_size: {cfg.batch_size}`")
    elif cfg.train and first_trainable(train_set, cfg.max_seq_length) is None:
        problems.append(
            f"no training example has a response token within `max_seq_length: {cfg.max_seq_length}` "
            f"(mask_prompt: {cfg.mask_prompt}); fix the data, raise max_seq_length or turn mask_prompt off"
        )
    for name, split in (("valid", valid_set if cfg.train else []), ("test", test_set if cfg.test else [])):
        if 0 < len(split) < cfg.batch_size:
            problems.append(f"{name}.jsonl has {len(split)} examples, fewer than `batch_size: {cfg.batch_size}`")
    if cfg.test and len(test_set) == 0:
        problems.append("`test: true` needs a test.jsonl in the data folder")
    if problems:
        raise ConfigError(problems)
    return train_set, valid_set, test_set


def make_evaluate(dataset: Any, cfg: types.SimpleNamespace, num_batches: int) -> Optional[Callable]:
    """``evaluate(model) -> (nll, tokens)`` over ``num_batches`` micro-batches (-1: all); None without data.

    The NLL is nan when no response token was evaluated (see :func:`empty_eval_note`). The same
    batches every time, and the global NumPy RNG that mlx-lm's batching uses is restored
    afterwards, so evaluating does not change the training order.
    """
    if not len(dataset):
        return None

    def evaluate(model: nn.Module) -> tuple[float, int]:
        with RestoredNumpyRandom():
            batches = iterate_micro_batches(dataset, cfg.batch_size, cfg.max_seq_length, loop=False, seed=cfg.seed)
            return evaluate_nll(model, batches if num_batches == -1 else itertools.islice(batches, num_batches))

    return evaluate


def empty_eval_note(cfg: types.SimpleNamespace, key: str) -> str:
    """Why an evaluation over ``key`` (``val_batches`` or ``test_batches``) saw no response token."""
    if getattr(cfg, key) == 0:
        why = f"`{key}: 0` evaluates no batch"
    else:
        why = (
            f"every response of those batches is masked (mask_prompt: {cfg.mask_prompt}) or cut by "
            f"`max_seq_length: {cfg.max_seq_length}`"
        )
    return f"{key.split('_')[0]} loss is nan: {why}, so there is no token to average (mlx_lm.lora gives nan too)"


def adapter_config(cfg: types.SimpleNamespace) -> dict[str, Any]:
    """What ``mlx_lm.load(adapter_path=...)`` reads (fine_tune_type, num_layers, lora_parameters) and the run's keys."""
    config = {k: v for k, v in vars(cfg).items() if k not in ("settings", "psft")}
    config.update(cfg.psft)
    if cfg.fine_tune_type == "full":
        config["lora_parameters"] = None  # as mlx_lm.lora writes it
    return config


def make_save(
    model: nn.Module, optimizer: optim.Optimizer, cfg: types.SimpleNamespace, announce: Callable[[Path], None]
) -> Callable[[int, float], None]:
    """Checkpoint function ``save(iteration, trained_tokens)``: ``adapters.safetensors`` and ``{iteration:07d}_...``.

    Called after the optimizer step that contains ``iteration``, so the state records the
    iterations of whole steps trained.
    """
    adapter_dir, ga = Path(cfg.adapter_path), cfg.grad_accumulation_steps

    def save(iteration: int, trained_tokens: float) -> None:
        trained = Start(-(-iteration // ga) * ga, trained_tokens)
        for name in (ADAPTER_FILE, f"{iteration:07d}_{ADAPTER_FILE}"):
            save_checkpoint(model, optimizer, adapter_dir / name, trained, cfg.optimizer)
        announce(adapter_dir / f"{iteration:07d}_{ADAPTER_FILE}")

    return save


def loop_args(cfg: types.SimpleNamespace, start: Start = Start()) -> LoopArgs:
    """The loop's schedule: ``iters`` iterations from ``start`` (as mlx-lm counts them, after a resume too)."""
    return LoopArgs(
        iters=start.iteration + cfg.iters,
        grad_accumulation_steps=cfg.grad_accumulation_steps,
        steps_per_report=cfg.steps_per_report,
        steps_per_eval=cfg.steps_per_eval,
        save_every=cfg.save_every,
        clear_cache_threshold=cfg.clear_cache_threshold,
        compile=cfg.compile if cfg.compile is not None else mx.default_device() == mx.gpu,
        start_iteration=start.iteration,
        start_tokens=start.tokens,
    )


class Callbacks:
    """Several mlx-lm ``TrainingCallback`` s as one (``None`` entries are skipped)."""

    def __init__(self, *callbacks: Any):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_train_loss_report(self, info: dict) -> None:
        for callback in self.callbacks:
            callback.on_train_loss_report(info)

    def on_val_loss_report(self, info: dict) -> None:
        for callback in self.callbacks:
            callback.on_val_loss_report(info)


def reporting_callbacks(cfg: types.SimpleNamespace) -> Any:
    """mlx-lm's ``get_reporting_callbacks`` for ``report_to`` (W&B, SwanLab), or ``None``.

    The packages were found installed when the configuration was checked
    (:func:`psft_plugin.mlx_train.config.reporter_install_problems`).
    """
    if not cfg.report_to:
        return None
    from mlx_lm.tuner.callbacks import get_reporting_callbacks

    return get_reporting_callbacks(
        cfg.report_to, project_name=cfg.project_name, log_dir=cfg.adapter_path, config=adapter_config(cfg)
    )


class ReportCallback:
    """Appends each report and each validation as a JSON line to ``path`` (truncated unless ``append``).

    A validation without any token has ``val_loss`` NaN and a ``note`` (``empty_note``) saying why.
    """

    def __init__(self, path: Path, append: bool = False, empty_note: str = ""):
        self.path, self.empty_note = Path(path), empty_note
        if not append or not self.path.is_file():
            self.path.write_text("")

    def _append(self, kind: str, info: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"kind": kind, **info}) + "\n")

    def on_train_loss_report(self, info: dict) -> None:
        self._append("train", info)

    def on_val_loss_report(self, info: dict) -> None:
        self._append("val", {**info, "note": self.empty_note} if info.get("val_tokens") == 0 else info)


def report_empty_steps(records: list[dict], cfg: types.SimpleNamespace, log: Callable[[str], None]) -> None:
    """Say once how many optimizer steps had no response token (they trained nothing)."""
    empty = sum(1 for r in records if r["tokens"] == 0)
    if empty:
        log(
            f"warning: {empty} of {len(records)} optimizer steps had no response token (every response masked "
            f"by mask_prompt: {cfg.mask_prompt} or cut by max_seq_length: {cfg.max_seq_length}); they did not change "
            f"the weights and are left out of the reported losses; raise max_seq_length or shorten the prompts"
        )


def start_notes(cfg: types.SimpleNamespace, log: Callable[[str], None]) -> None:
    """Say once, before training, where this run differs from ``mlx_lm.lora`` on purpose or replaces files."""
    ga = cfg.grad_accumulation_steps
    differs = "only response tokens count in the loss (mlx-lm's mask adds one padding position per sequence)"
    if ga > 1:
        differs += (
            f"; with `grad_accumulation_steps: {ga}` a step's loss is the mean over all its micro-batches' "
            f"tokens (mlx-lm averages the micro-batch means)"
        )
    note(log, f"unlike mlx_lm.lora, on purpose: {differs}")
    if cfg.iters % ga:
        note(
            log,
            f"`iters: {cfg.iters}` is not a multiple of `grad_accumulation_steps: {ga}`: the last "
            f"{cfg.iters % ga} iteration(s) would end in no optimizer step (mlx_lm.lora computes and discards "
            f"them), so {cfg.iters - cfg.iters % ga} are trained",
        )
    folder = Path(cfg.adapter_path)
    if (folder / ADAPTER_FILE).is_file() and not cfg.resume_adapter_file:
        note(
            log,
            f"`adapter_path: {cfg.adapter_path}` holds an earlier run's adapters: this run trains into it, "
            f"replacing them, adapter_config.json and metrics.jsonl (as mlx_lm.lora does)",
        )


def open_outputs(cfg: types.SimpleNamespace, log: Callable[[str], None]) -> tuple[Path, Any]:
    """The output folder, once every check has passed: ``report_to`` services, then ``adapter_config.json``.

    Returns the folder and the reporting callback (or ``None``).
    """
    start_notes(cfg, log)
    adapter_dir = Path(cfg.adapter_path)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    reporting = reporting_callbacks(cfg)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config(cfg), indent=2, sort_keys=True))
    return adapter_dir, reporting


def train_model(
    cfg: types.SimpleNamespace,
    model: nn.Module,
    train_set: Any,
    valid_set: Any,
    callback: Any,
    log: Callable[[str], None],
) -> list[dict]:
    """Adapters, optimizer, resume, console and callbacks around :func:`psft_mlx.trainer.train`.

    Nothing in ``adapter_path`` is created or changed before the model, the adapters and the
    resume file have been checked (the configuration and data were checked before loading).
    """
    from mlx_lm.tuner.utils import print_trainable_parameters

    prepare_model(model, cfg)
    optimizer = build_optimizer(cfg)
    start = resume(model, optimizer, cfg, log) if cfg.resume_adapter_file else Start()
    args = loop_args(cfg, start)
    adapter_dir, reporting = open_outputs(cfg, log)
    val_note = empty_eval_note(cfg, "val_batches")
    ui = TrainConsole(args.iters - args.iters % args.grad_accumulation_steps, start.iteration, val_note)
    ui.print_header(cfg)
    print_trainable_parameters(model)
    metrics = ReportCallback(adapter_dir / METRICS_FILE, append=start.iteration > 0, empty_note=val_note)
    batches = iterate_micro_batches(
        train_set, cfg.batch_size, cfg.max_seq_length, loop=True, seed=cfg.seed, skip=start.iteration
    )
    with ui:
        records = train(
            model,
            optimizer,
            batches,
            cfg.settings,
            args,
            callback=Callbacks(metrics, ui, reporting, callback),
            evaluate=make_evaluate(valid_set, cfg, cfg.val_batches),
            save=make_save(model, optimizer, cfg, ui.saved),
            warmup_objective=get_objective("ce"),
            progress=ui.advance,
        )
    last = int(records[-1]["iteration"]) if records else start.iteration
    trained = Start(last, start.tokens + sum(r["tokens"] for r in records))
    save_checkpoint(model, optimizer, adapter_dir / ADAPTER_FILE, trained, cfg.optimizer)
    log(f"Saved final weights to {adapter_dir / ADAPTER_FILE}")
    report_empty_steps(records, cfg, log)
    return records


def load_for_test(model: nn.Module, cfg: types.SimpleNamespace, log: Callable[[str], None]) -> list[dict]:
    """``train: false``: the adapters in ``adapter_path``, read only (mlx-lm's ``load_adapters``; ``""``: the base model)."""
    from mlx_lm.tuner.utils import load_adapters

    if cfg.adapter_path != "":
        load_adapters(model, cfg.adapter_path)
        log(f"Loaded the adapters in {cfg.adapter_path}")
    return []


def evaluate_test_set(model: nn.Module, test_set: Any, cfg: types.SimpleNamespace, log: Callable[[str], None]) -> float:
    """``test: true``: the test NLL over ``test_batches``, printed as ``mlx_lm.lora`` prints it (nan without tokens)."""
    nll, tokens = make_evaluate(test_set, cfg, cfg.test_batches)(model)
    if not tokens:
        note(log, empty_eval_note(cfg, "test_batches"))
    log(f"Test loss {nll:.3f}, Test ppl {math.exp(nll):.3f}.")
    return nll


def run(cfg: types.SimpleNamespace, callback: Any = None, log: Callable[[str], None] = print) -> list[dict]:
    """``mlx_lm.lora``'s run: load, train (or load the adapters), test; return the per-step records.

    ``callback`` (an mlx-lm ``TrainingCallback``) receives the reports too, beside the console,
    ``metrics.jsonl`` and the ``report_to`` services.
    """
    np.random.seed(cfg.seed)
    log("Loading pretrained model")
    model, tokenizer = load_model(cfg)
    log("Loading datasets")
    train_set, valid_set, test_set = load_data(cfg, tokenizer)
    if cfg.train:
        log("Training")
        records = train_model(cfg, model, train_set, valid_set, callback, log)
    else:
        records = load_for_test(model, cfg, log)
    if cfg.test:
        log("Testing")
        evaluate_test_set(model, test_set, cfg, log)
    return records
