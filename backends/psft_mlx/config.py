"""YAML + command-line configuration of the MLX trainer, each key declared once.

mlx-lm ``lora`` keys are declared in :data:`MLX_KEYS` (defaults as in mlx-lm 0.32.2); the
``loss`` key and the ``psft_*`` keys come from the objectives' :class:`~psft_plugin.options.Option`
declarations in the registry. The argparse flags, the defaults, the validation and the docs
table are all derived from these two sources. Command-line flags override the YAML, which
overrides the defaults, as in ``mlx_lm.lora``.
"""

from __future__ import annotations

import argparse
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from psft_plugin.objective import Objective
from psft_plugin.options import ConfigError, Option, markdown_table, unknown_keys
from psft_plugin.registry import UnknownObjectiveError, default_registry


@dataclass(frozen=True)
class Key:
    """One mlx-lm configuration key.

    ``kind`` is ``int``, ``float``, ``str``, ``bool``, ``dict`` or ``any``; ``flag=False`` keys
    (nested mappings) are YAML-only. ``ge``/``gt`` are numeric bounds.
    """

    name: str
    default: Any
    help: str
    kind: str = "str"
    ge: Optional[float] = None
    gt: Optional[float] = None
    choices: Optional[tuple[str, ...]] = None
    flag: bool = True

    def problem(self, value: Any) -> Optional[str]:
        """A sentence naming the key, the bad value and the fix, or ``None``."""
        if value is None or self.kind == "any":
            return None
        expected = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict}[self.kind]
        if not isinstance(value, expected) or (self.kind in ("int", "float") and isinstance(value, bool)):
            return f"`{self.name}: {value!r}` must be a {self.kind}"
        if self.choices is not None and value not in self.choices:
            return f"`{self.name}: {value!r}` is not allowed; use one of {', '.join(self.choices)}"
        if self.ge is not None and value < self.ge:
            return f"`{self.name}: {value}` is out of range; it must be >= {self.ge}"
        if self.gt is not None and value <= self.gt:
            return f"`{self.name}: {value}` is out of range; it must be > {self.gt}"
        return None


LORA_DEFAULTS = {"rank": 8, "dropout": 0.0, "scale": 20.0}

MLX_KEYS: tuple[Key, ...] = (
    Key("model", None, "local model directory (or a Hugging Face repo id mlx-lm may download)"),
    Key("data", None, "directory with train.jsonl/valid.jsonl/test.jsonl (or a Hugging Face dataset id)"),
    Key("train", True, "kept for mlx-lm configs: this trainer always trains", "bool"),
    Key("fine_tune_type", "lora", "what to train", choices=("lora", "dora", "full")),
    Key("optimizer", "adam", "mlx.optimizers class", choices=("adam", "adamw", "muon", "sgd", "adafactor")),
    Key("optimizer_config", {}, "keyword arguments per optimizer, e.g. {adamw: {weight_decay: 0.1}}", "dict",
        flag=False),
    Key("mask_prompt", False, "train only on the last (assistant) message / the completion", "bool"),
    Key("num_layers", 16, "number of top transformer blocks to fine-tune; -1 for all", "int", ge=-1),
    Key("batch_size", 4, "sequences per micro-batch", "int", ge=1),
    Key("iters", 1000, "optimizer steps (each of grad_accumulation_steps micro-batches)", "int", ge=1),
    Key("val_batches", 25, "validation micro-batches per evaluation; -1 for the whole set", "int", ge=-1),
    Key("learning_rate", 1e-5, "learning rate (ignored when lr_schedule is set)", "float", gt=0.0),
    Key("steps_per_report", 10, "optimizer steps between progress reports", "int", ge=1),
    Key("steps_per_eval", 200, "optimizer steps between validation NLL evaluations", "int", ge=1),
    Key("grad_accumulation_steps", 1, "micro-batches per optimizer step (GA)", "int", ge=1),
    Key("resume_adapter_file", None, "adapters.safetensors to start from"),
    Key("adapter_path", "adapters", "output folder: adapters, adapter_config.json, metrics.jsonl"),
    Key("save_every", 100, "optimizer steps between checkpoints", "int", ge=1),
    Key("test", False, "report test-set NLL after training", "bool"),
    Key("test_batches", 500, "test micro-batches; -1 for the whole set", "int", ge=-1),
    Key("max_seq_length", 2048, "longer sequences are truncated", "int", ge=2),
    Key("grad_checkpoint", False, "recompute activations in the backward pass to save memory", "bool"),
    Key("clear_cache_threshold", 0, "clear MLX's allocator cache when it exceeds this many bytes", "int", ge=0),
    Key("lr_schedule", None, "mlx-lm schedule: {name, arguments, warmup, warmup_init}", "dict", flag=False),
    Key("lora_parameters", LORA_DEFAULTS, "LoRA/DoRA {rank, scale, dropout, keys}", "dict", flag=False),
    Key("seed", 0, "seed of the data order and the adapter initialisation", "int"),
    Key("trust_remote_code", False, "allow custom model/tokenizer code", "bool"),
    Key("hf_dataset", None, "mlx-lm's Hugging Face dataset collection", "any", flag=False),
    Key("prompt_feature", "prompt", "completions data: prompt field", flag=False),
    Key("completion_feature", "completion", "completions data: completion field", flag=False),
    Key("chat_feature", "messages", "chat data: messages field", flag=False),
    Key("text_feature", "text", "text data: text field", flag=False),
    Key("compile", None, "compile the micro-batch step with mx.compile (psft_mlx extension); default: on "
        "for a GPU, off on the CPU, where MLX compiles through a C++ compiler for every new shape", "bool"),
)
LOSS_KEY = Key("loss", "ce", "objective name from the registry: `psft` for PSFT, `ce` for plain SFT")
UNSUPPORTED = {
    "report_to": "psft_mlx writes metrics.jsonl next to the adapters instead",
    "project_name": "psft_mlx writes metrics.jsonl next to the adapters instead",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``psft_plugin.mlx_train`` command line, derived from the declarations."""
    parser = argparse.ArgumentParser(prog="python -m psft_plugin.mlx_train",
                                     description="Fine-tune an mlx-lm model with PSFT (or plain SFT).")
    parser.add_argument("-c", "--config", help="YAML file with mlx-lm `lora` keys plus `loss` and `psft_*` keys")
    for key in (*MLX_KEYS, LOSS_KEY):
        if key.flag:
            _add_flag(parser, key.name, key.kind, key.help, key.choices)
    for option in default_registry().options().values():
        kind = "int" if option.type is int else ("float" if option.type is float else "str")
        _add_flag(parser, option.key, kind, f"{option.help} (default {option.default})", option.choices)
    return parser


def _add_flag(parser: argparse.ArgumentParser, name: str, kind: str, help: str,
              choices: Optional[Sequence[str]]) -> None:
    flag = "--" + name.replace("_", "-")
    if kind == "bool":
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help)
    else:
        parser.add_argument(flag, dest=name, type={"int": int, "float": float}.get(kind, str), default=None,
                            choices=choices, help=help)


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
    data = yaml.load(file.read_text(), _YamlLoader) or {}
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
    return resolve_config({**values, **cli}, problems)


def resolve_config(values: Mapping[str, Any], problems: Sequence[str] = ()) -> types.SimpleNamespace:
    """Defaults filled and everything validated; ``objective`` and ``psft`` (resolved options) added."""
    problems = list(problems)
    options = default_registry().options()
    known = [key.name for key in (*MLX_KEYS, LOSS_KEY)] + list(options)
    problems += unknown_keys([k for k in values if k not in UNSUPPORTED], known)
    problems += [f"`{k}` is not supported: {why}; remove it" for k, why in UNSUPPORTED.items()
                 if values.get(k) is not None]
    cfg = {key.name: key.default if values.get(key.name) is None else values[key.name] for key in MLX_KEYS}
    problems += [p for key in MLX_KEYS if (p := key.problem(cfg[key.name]))]
    if cfg["train"] is False:
        problems.append("`train: false`: this trainer only trains; evaluate with `mlx_lm.lora --test` instead")
    cfg["lora_parameters"], lora_problems = _lora_parameters(cfg["lora_parameters"])
    objective, psft, objective_problems, notes = resolve_objective(values, options)
    problems += lora_problems + objective_problems + path_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return types.SimpleNamespace(**cfg, loss=objective.name, objective=objective, psft=psft, notes=notes)


def _lora_parameters(value: Any) -> tuple[dict[str, Any], list[str]]:
    if not isinstance(value, dict):
        return dict(LORA_DEFAULTS), []  # the kind check has already reported it
    problems = unknown_keys(value, ["rank", "scale", "dropout", "keys"])
    return {**LORA_DEFAULTS, **value}, [f"in `lora_parameters`: {p}" for p in problems]


def resolve_objective(values: Mapping[str, Any], options: Mapping[str, Option]) -> tuple[
        Optional[Objective], dict[str, Any], list[str], list[str]]:
    """The ``loss`` objective, its validated options, problems and notes.

    A ``psft_*`` key the objective does not read is an error when ``loss`` was left out (the
    user most likely meant ``loss: psft``) and a note when ``loss`` was chosen explicitly.
    """
    registry = default_registry()
    name = values.get("loss") or LOSS_KEY.default
    try:
        objective = registry.get(str(name))
    except UnknownObjectiveError as error:
        return None, {}, [str(error)], []
    problems, notes = [], []
    own = {option.key for option in objective.options}
    for key in sorted(k for k in options if k not in own and values.get(k) is not None):
        users = " or ".join(n for n in registry.names() if key in {o.key for o in registry.get(n).options})
        if values.get("loss") is None:  # forgot `loss: psft`: never train plain CE silently
            problems.append(f"`{key}` is set but `loss` is not, so plain `ce` would train and ignore it; "
                            f"set `loss: {users}` (or `loss: ce` to compare against SFT on purpose)")
        else:
            notes.append(f"note: `loss: {name}` ignores `{key}` (used by `loss: {users}`)")
    try:
        resolved = objective.resolve(values)
    except ConfigError as error:
        return objective, {}, problems + error.problems, notes
    return objective, resolved, problems, notes


def _looks_local(name: str) -> bool:
    """A path rather than a Hugging Face id (ids are exactly ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def path_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Missing model, data or resume files, named with the fix."""
    problems = []
    model, data = cfg["model"], cfg["data"]
    if model is None:
        problems.append("no model: set `model:` in the YAML or pass `--model PATH`")
    elif Path(model).expanduser().is_dir():
        if not (Path(model).expanduser() / "config.json").is_file():
            problems.append(f"`model: {model}` has no config.json; point it at an mlx-lm/Hugging Face model folder")
    elif _looks_local(model):
        problems.append(f"`model: {model}` does not exist; build or download the model there, or pass `--model PATH`")
    if data is None and cfg["hf_dataset"] is None:
        problems.append("no data: set `data:` (a folder with train.jsonl) or pass `--data PATH`")
    elif data is not None and cfg["hf_dataset"] is None:
        folder = Path(data).expanduser()
        if folder.is_dir() and not (folder / "train.jsonl").is_file():
            problems.append(f"`data: {data}` has no train.jsonl; it needs train.jsonl (and valid.jsonl for evaluation)")
        elif not folder.is_dir() and _looks_local(data):
            problems.append(f"`data: {data}` does not exist; create the folder with train.jsonl/valid.jsonl "
                            f"or pass `--data PATH`")
    resume = cfg["resume_adapter_file"]
    if resume is not None and not Path(resume).expanduser().is_file():
        problems.append(f"`resume_adapter_file: {resume}` does not exist; point it at an adapters.safetensors file")
    return problems


def options_table() -> str:
    """Markdown table of the mlx-lm keys (for docs/mlx.md), generated from :data:`MLX_KEYS`."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for k in MLX_KEYS:
        choices = f" (one of {', '.join(f'`{c}`' for c in k.choices)})" if k.choices else ""
        where = "" if k.flag else " (YAML only)"
        rows.append(f"| `{k.name}` | `{k.default}` | {k.help}{choices}{where} |")
    return "\n".join(rows)


def docs_tables() -> str:
    """Both configuration tables of docs/mlx.md: ``loss`` and the objectives' keys, then mlx-lm's."""
    names = ", ".join(f"`{name}`" for name in default_registry().names())
    loss_row = f"| `{LOSS_KEY.name}` | `{LOSS_KEY.default}` | {names} | {LOSS_KEY.help} |"
    header, rule, *rows = markdown_table(list(default_registry().options().values())).splitlines()
    return "\n".join([header, rule, loss_row, *rows]) + "\n\n" + options_table()
