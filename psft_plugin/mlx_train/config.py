"""YAML + command-line configuration of the MLX host, each key declared once.

mlx-lm ``lora`` keys are declared in :data:`MLX_KEYS` (defaults as in mlx-lm 0.32.2), as
:class:`~psft_plugin.options.Option` s like the objectives' own; ``loss``
(:data:`psft_plugin.config.LOSS_OPTION`) and the ``psft_*`` keys come from the core and the
registry. The argparse flags, the defaults, the validation and the docs table are all derived
from these declarations. Command-line flags override the YAML, which overrides the defaults, as
in ``mlx_lm.lora``. The rules every host shares are the core resolver's; :func:`host_problems`
holds what only this host checks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from psft_plugin.config import LOSS_OPTION, resolve
from psft_plugin.mlx_train import checks
from psft_plugin.objectives import LM_HEAD_CHUNK_KEY
from psft_plugin.options import ConfigError, Option, markdown_table, suggest
from psft_plugin.registry import default_registry


def lower(value: Any) -> Any:
    """mlx-lm lower-cases optimizer names (``AdamW`` is ``adamw``)."""
    return value.lower() if isinstance(value, str) else value


def parse_size(value: Any) -> Any:
    """Bytes from ``1GB``/``512MB``/``2G``/``100`` with mlx-lm's own CLI parser; ints pass through."""
    if not isinstance(value, str):
        return value
    from decimal import InvalidOperation

    from mlx_lm.utils import _parse_size  # what `mlx_lm.lora --clear-cache-threshold` uses

    try:
        return _parse_size(value)
    except (KeyError, InvalidOperation):
        raise ValueError(
            "is not a size; write a number of bytes or a size such as `512MB` or `1GB` (units M, MB, G, GB)"
        ) from None


LORA_DEFAULTS = {"rank": 8, "dropout": 0.0, "scale": 20.0}
REPORTERS = ("wandb", "swanlab")

MLX_KEYS: tuple[Option, ...] = (
    Option("model", None, "local model directory (or a Hugging Face repo id mlx-lm may download)", type=str),
    Option("data", None, "directory with train.jsonl/valid.jsonl/test.jsonl (or a Hugging Face dataset id)", type=str),
    Option(
        "train",
        False,
        "train into adapter_path (as in mlx-lm, off unless set: `--test` alone evaluates the adapters "
        "in adapter_path and writes nothing)",
        type=bool,
    ),
    Option("fine_tune_type", "lora", "what to train", type=str, choices=("lora", "dora", "full")),
    Option(
        "optimizer",
        "adam",
        "mlx.optimizers class, case-insensitive",
        type=str,
        choices=tuple(checks.OPTIMIZER_CLASSES),
        parse=lower,
    ),
    Option(
        "optimizer_config",
        {},
        "keyword arguments per optimizer, e.g. {adamw: {weight_decay: 0.1}}",
        type=dict,
        flag=False,
    ),
    Option("mask_prompt", False, "train only on the last (assistant) message / the completion", type=bool),
    Option("num_layers", 16, "number of top transformer blocks to fine-tune; -1 for all", type=int, ge=-1),
    Option("batch_size", 4, "sequences per micro-batch", type=int, ge=1),
    Option(
        "iters",
        1000,
        "iterations (micro-batches) to train for; an optimizer step every grad_accumulation_steps",
        type=int,
        ge=1,
    ),
    Option(
        "val_batches", 25, "validation micro-batches per evaluation; -1 for the whole set (0: nan)", type=int, ge=-1
    ),
    Option("learning_rate", 1e-5, "learning rate (ignored when lr_schedule is set)", type=float, gt=0.0),
    Option("steps_per_report", 10, "iterations between progress reports", type=int, ge=1),
    Option("steps_per_eval", 200, "iterations between validation NLL evaluations", type=int, ge=1),
    Option("grad_accumulation_steps", 1, "micro-batches per optimizer step (GA)", type=int, ge=1),
    Option(
        "resume_adapter_file",
        None,
        "adapters.safetensors to continue from (with its optimizer state if saved), for `iters` more iterations",
        type=str,
    ),
    Option("adapter_path", "adapters", "output folder: adapters, adapter_config.json, metrics.jsonl", type=str),
    Option("save_every", 100, "iterations between checkpoints", type=int, ge=1),
    Option("test", False, "report test-set NLL after training (or instead of it, with `train: false`)", type=bool),
    Option("test_batches", 500, "test micro-batches; -1 for the whole set", type=int, ge=-1),
    Option("max_seq_length", 2048, "longer sequences are truncated", type=int, ge=2),
    Option("grad_checkpoint", False, "recompute activations in the backward pass to save memory", type=bool),
    Option(
        "clear_cache_threshold",
        0,
        "clear MLX's allocator cache when it exceeds this size (bytes, or `1GB`, `512MB`)",
        type=int,
        ge=0,
        parse=parse_size,
    ),
    Option("lr_schedule", None, "mlx-lm schedule: {name, arguments, warmup, warmup_init}", type=dict, flag=False),
    Option("lora_parameters", LORA_DEFAULTS, "LoRA/DoRA {rank, scale, dropout, keys}", type=dict, flag=False),
    Option("seed", 0, "seed of the data order and the adapter initialisation", type=int),
    Option("trust_remote_code", False, "allow custom model/tokenizer code", type=bool),
    Option("report_to", None, "also log to `wandb`, `swanlab` or `wandb,swanlab` (mlx-lm's callbacks)", type=str),
    Option("project_name", None, "W&B / SwanLab project name", type=str),
    Option("hf_dataset", None, "mlx-lm's Hugging Face dataset collection", type=object, flag=False),
    Option("prompt_feature", "prompt", "completions data: prompt field", type=str, flag=False),
    Option("completion_feature", "completion", "completions data: completion field", type=str, flag=False),
    Option("chat_feature", "messages", "chat data: messages field", type=str, flag=False),
    Option("text_feature", "text", "text data: text field", type=str, flag=False),
    Option(
        "compile",
        None,
        "compile the micro-batch step with mx.compile (psft_mlx extension); default: on "
        "for a GPU, off on the CPU, where MLX compiles through a C++ compiler for every new shape",
        type=bool,
    ),
)
OTHER_NAMES = {
    "lora_layers": "an older mlx-lm name; use `num_layers`",
    "warmup_steps": "mlx-lm's learning-rate warm-up is `warmup` in `lr_schedule` (optimizer steps), e.g. "
    "`lr_schedule: {name: cosine_decay, arguments: [1e-5, 1000], warmup: 100}`; `psft_warmup_steps` is "
    "another thing: plain-SFT steps before PSFT starts",
    "warmup": "mlx-lm's learning-rate warm-up is `warmup` in `lr_schedule`, e.g. "
    "`lr_schedule: {name: cosine_decay, arguments: [1e-5, 1000], warmup: 100}`",
    "gradient_accumulation_steps": "mlx-lm's name is `grad_accumulation_steps`",
    "max_steps": "mlx-lm's name is `iters` (micro-batches to train)",
    "num_epochs": "mlx-lm counts `iters` (micro-batches), not epochs",
    "lr": "mlx-lm's name is `learning_rate`",
    "output_dir": "mlx-lm's name is `adapter_path`",
    "weight_decay": "mlx-lm takes it per optimizer: `optimizer_config: {adamw: {weight_decay: 0.01}}`",
}
"""Keys of older mlx-lm versions and of other trainers (Axolotl, Hugging Face), each answered with
mlx-lm's own key, never a merely similar-looking ``psft_*`` one (``warmup_steps`` is not
``psft_warmup_steps``)."""
PATH_KEYS = ("model", "data", "adapter_path", "resume_adapter_file")
FEATURE_KEYS = ("prompt_feature", "completion_feature", "chat_feature", "text_feature")


def build_parser() -> argparse.ArgumentParser:
    """The ``psft_plugin.mlx_train`` command line, derived from the declarations."""
    parser = argparse.ArgumentParser(
        prog="python -m psft_plugin.mlx_train", description="Fine-tune an mlx-lm model with PSFT (or plain SFT)."
    )
    parser.add_argument("-c", "--config", help="YAML file with mlx-lm `lora` keys plus `loss` and `psft_*` keys")
    for option in MLX_KEYS:
        _add_flag(parser, option, option.help)
    for option in (LOSS_OPTION, *default_registry().options().values()):
        _add_flag(parser, option, f"{option.help} (default {option.default})")
    return parser


def _add_flag(parser: argparse.ArgumentParser, option: Option, help: str) -> None:
    """``--key`` (``--key/--no-key`` for a bool) for ``option``, unless it is YAML-only; unset flags are ``None``."""
    if not option.flag:
        return
    flag = "--" + option.key.replace("_", "-")
    if option.type is bool:
        parser.add_argument(flag, dest=option.key, action=argparse.BooleanOptionalAction, default=None, help=help)
    else:  # a parsed option takes the raw string, which the resolver parses and checks like the YAML's
        kind = option.type if option.type in (int, float) and option.parse is None else str
        parser.add_argument(
            flag,
            dest=option.key,
            type=kind,
            default=None,
            help=help,
            choices=option.choices if option.parse is None else None,
        )


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``), like mlx-lm."""


_YamlLoader.add_implicit_resolver(  # mlx_lm.lora's float pattern: a dot or an exponent is required
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: Optional[str]) -> tuple[dict[str, Any], list[str]]:
    """The YAML mapping at ``path`` (empty without one) and any problem reading it."""
    if path is None:
        return {}, []
    file = Path(path)
    if not file.is_file():
        return {}, [f"config file `{path}` does not exist; check the `--config` path"]
    try:
        data = yaml.load(file.read_text(), _YamlLoader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(error, "problem", None) or str(error).splitlines()[0]
        return {}, [
            f"config file `{path}` is not valid YAML: {what}{where}; fix the syntax there "
            f"(`key: value` per line, nested mappings indented or written as {{a: 1, b: 2}})"
        ]
    if not isinstance(data, dict):
        return {}, [f"config file `{path}` must be a YAML mapping of keys to values"]
    return data, []


def load_config(argv: Optional[Sequence[str]] = None) -> types.SimpleNamespace:
    """Parse the command line, read ``--config`` and return the validated configuration.

    Raises :class:`ConfigError` listing every problem (unknown keys with a close match, bad
    values, unknown ``loss``, missing paths).
    """
    cli = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    values, problems = read_yaml(cli.pop("config", None))
    if problems:  # an unreadable file: what is missing from it would only repeat that
        raise ConfigError(problems)
    return resolve_config({**values, **cli})


def resolve_config(values: Mapping[str, Any]) -> types.SimpleNamespace:
    """Defaults filled and everything validated; ``settings`` (the core's) and ``psft`` (the objective's options) added.

    The rules every host shares are the core resolver's (:func:`psft_plugin.config.resolve`); this
    host hands it the mlx-lm keys it knows and the problems only it checks (:func:`host_problems`).
    """
    cfg, problems = {}, []
    for option in MLX_KEYS:
        cfg[option.key], problem = option.read(values.get(option.key))
        problems += [problem] if problem else []
    problems += host_problems(values, cfg)
    if isinstance(cfg["lora_parameters"], dict):
        cfg["lora_parameters"] = {**LORA_DEFAULTS, **cfg["lora_parameters"]}
    settings = resolve(
        values, host_keys=[option.key for option in MLX_KEYS] + list(OTHER_NAMES), closed=True, host_problems=problems
    )
    return types.SimpleNamespace(**cfg, loss=settings.objective.name, settings=settings, psft=dict(settings.resolved))


def host_problems(values: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    """What only this host checks: renamed mlx-lm keys, its nested mappings and paths, the torch-only option.

    ``values`` is the raw mapping, ``cfg`` the mlx-lm keys read from it (:data:`MLX_KEYS`).
    """
    problems = [f"unknown key `{k}`: {OTHER_NAMES[k]}" for k in values if k in OTHER_NAMES]
    if not cfg["train"] and not cfg["test"]:
        problems.append(
            "neither `train` nor `test` is set (both default to false, as in mlx_lm.lora): nothing to do; "
            "set `train: true` (`--train`) to train into `adapter_path`, or `test: true` (`--test`) to "
            "evaluate the adapters in it on test.jsonl"
        )
    problems += report_to_problems(cfg["report_to"])
    if isinstance(cfg["report_to"], str) and not report_to_problems(cfg["report_to"]):
        problems += reporter_install_problems(cfg["report_to"])
    problems += (
        checks.lora_problems(cfg["lora_parameters"])
        + checks.schedule_problems(cfg["lr_schedule"])
        + checks.optimizer_config_problems(cfg["optimizer_config"])
        + checks.hf_dataset_problems(cfg["hf_dataset"])
    )
    chunk = values.get(LM_HEAD_CHUNK_KEY)
    if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0:  # the core checks its range
        problems.append(
            f"`{LM_HEAD_CHUNK_KEY}: {chunk}` is not supported by the MLX trainer (it builds the full "
            f"logits); set `{LM_HEAD_CHUNK_KEY}: 0` or remove it"
        )
    if all(
        cfg[key] is None or isinstance(cfg[key], str) for key in PATH_KEYS + FEATURE_KEYS
    ):  # else: reported as a bad type
        problems += path_problems(cfg)
    return problems


def report_to_problems(value: Any) -> list[str]:
    """``report_to``: a comma-separated list of mlx-lm's reporters (``wandb``, ``swanlab``)."""
    if not isinstance(value, str):
        return []
    names = [item.strip().lower() for item in value.split(",") if item.strip()]
    return [
        f"`report_to: {value}`: `{name}` is not one of mlx-lm's reporters{suggest(name, REPORTERS)}; "
        f"use {' or '.join(REPORTERS)} (comma-separated for both)"
        for name in names
        if name not in REPORTERS
    ]


def reporter_install_problems(value: str) -> list[str]:
    """``report_to`` services whose package cannot be imported (mlx-lm's callbacks import ``wandb``/``swanlab``).

    Checked with the configuration, so a missing one stops the run before any file is written.
    """
    names = dict.fromkeys(item.strip().lower() for item in value.split(",") if item.strip())
    return [
        f"`report_to: {value}`: {name} is not installed; `pip install {name}`, or remove it from `report_to`"
        for name in names
        if name not in sys.modules and importlib.util.find_spec(name) is None
    ]


def num_layers_problem(num_layers: int, layers: int) -> Optional[str]:
    """``num_layers`` against the model's ``layers`` transformer blocks (-1: all)."""
    if num_layers <= layers:
        return None
    return f"`num_layers: {num_layers}` but the model has {layers} layers; use at most {layers} (or -1 for all)"


def model_problems(folder: Path, cfg: Mapping[str, Any]) -> list[str]:
    """A local model folder: its ``config.json``, and (to train) ``num_layers`` against its ``num_hidden_layers``."""
    config = folder / "config.json"
    if not config.is_file():
        return [f"`model: {cfg['model']}` has no config.json; point it at an mlx-lm/Hugging Face model folder"]
    try:
        layers = json.loads(config.read_text()).get("num_hidden_layers")
    except (json.JSONDecodeError, AttributeError):
        return [f"`model: {cfg['model']}`: its config.json is not a JSON object; re-download or rebuild the model"]
    checked = cfg["train"] is True and isinstance(cfg["num_layers"], int) and isinstance(layers, int)
    problem = num_layers_problem(cfg["num_layers"], layers) if checked else None
    return [problem] if problem else []


def _looks_local(name: str) -> bool:
    """A path rather than a Hugging Face id (ids are exactly ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def path_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Missing model, data or resume files and unreadable data files, named with the fix.

    An ``owner/name`` that is not a local folder is left to the loader (a Hugging Face id);
    :mod:`psft_plugin.mlx_train.run` explains a failed download.
    """
    problems = []
    model, data = cfg["model"], cfg["data"]
    if model is None:
        problems.append("no model: set `model:` in the YAML or pass `--model PATH`")
    elif Path(model).expanduser().is_dir():
        problems += model_problems(Path(model).expanduser(), cfg)
    elif _looks_local(model):
        problems.append(f"`model: {model}` does not exist; build or download the model there, or pass `--model PATH`")
    if data is None and cfg["hf_dataset"] is None:
        problems.append("no data: set `data:` (a folder with train.jsonl) or pass `--data PATH`")
    elif data is not None and cfg["hf_dataset"] is None:
        if Path(data).expanduser().is_dir():
            features = {key: cfg[key] for key in FEATURE_KEYS}
            problems += checks.data_folder_problems(data, cfg["train"], cfg["test"], features, cfg["mask_prompt"])
        elif _looks_local(data):
            problems.append(
                f"`data: {data}` does not exist; create the folder with train.jsonl/valid.jsonl or pass `--data PATH`"
            )
    if not cfg["train"] and cfg["test"] and cfg["adapter_path"] != "":
        folder = Path(cfg["adapter_path"]).expanduser()
        missing = [n for n in ("adapter_config.json", "adapters.safetensors") if not (folder / n).is_file()]
        if missing:
            problems.append(
                f"`train: false` tests the adapters in `adapter_path: {cfg['adapter_path']}`, which has no "
                f"{' or '.join(missing)}; train first, point `adapter_path` at a trained folder, "
                f'or set `adapter_path: ""` to test the base model'
            )
    resume = cfg["resume_adapter_file"]
    if resume is not None and not Path(resume).expanduser().is_file():
        problems.append(f"`resume_adapter_file: {resume}` does not exist; point it at an adapters.safetensors file")
    return problems


def options_table() -> str:
    """Markdown table of the mlx-lm keys (for docs/mlx.md), generated from :data:`MLX_KEYS`."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for option in MLX_KEYS:
        choices = f" (one of {', '.join(f'`{c}`' for c in option.choices)})" if option.choices else ""
        where = "" if option.flag else " (YAML only)"
        rows.append(f"| `{option.key}` | `{option.default}` | {option.help}{choices}{where} |")
    return "\n".join(rows)


def docs_tables() -> str:
    """Both configuration tables of docs/mlx.md: ``loss`` and the objectives' keys, then mlx-lm's."""
    names = ", ".join(f"`{name}`" for name in default_registry().names())
    loss_row = f"| `{LOSS_OPTION.key}` | `{LOSS_OPTION.default}` | {names} | {LOSS_OPTION.help} |"
    header, rule, *rows = markdown_table(list(default_registry().options().values())).splitlines()
    return "\n".join([header, rule, loss_row, *rows]) + "\n\n" + options_table()
