"""Checks of what mlx-lm reads without checking: the nested YAML mappings and the data files.

mlx-lm 0.32.2 passes ``lora_parameters``, ``optimizer_config``, ``lr_schedule`` and
``hf_dataset`` on as they are, so a misspelt nested key is silently ignored (or a ``KeyError``
deep inside), and an empty ``train.jsonl`` fails with an ``IndexError``. Each function here
returns sentences naming the key or file, what is wrong and the fix; nothing is raised, so the
caller can report every problem at once. mlx-lm also reads each data row only when it first
batches it, so a row without its format's field stops a run midway with a ``KeyError``; every
row is checked here, before anything is loaded or written.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from psft_plugin.options import suggest, unknown_keys

LORA_KEYS = ("rank", "scale", "dropout", "keys")
SCHEDULE_KEYS = ("name", "arguments", "warmup", "warmup_init")
HF_DATASET_KEYS = (
    "path",
    "train_split",
    "valid_split",
    "test_split",
    "config",
    "prompt_feature",
    "completion_feature",
    "chat_feature",
    "text_feature",
)
OPTIMIZER_CLASSES = {"adam": "Adam", "adamw": "AdamW", "muon": "Muon", "sgd": "SGD", "adafactor": "Adafactor"}
"""``optimizer`` names (mlx-lm's, lower case) and their ``mlx.optimizers`` classes: the one list of them."""


def _in(where: str, problems: list[str]) -> list[str]:
    return [f"in `{where}`: {p}" for p in problems]


def lora_problems(value: Any) -> list[str]:
    """``lora_parameters``: unknown keys; PEFT's ``alpha`` explained as mlx-lm's ``scale``."""
    if not isinstance(value, Mapping):
        return []  # the kind check reports it
    problems = unknown_keys([k for k in value if k != "alpha"], LORA_KEYS)
    if "alpha" in value:
        rank = value.get("rank", 8)
        example = (
            f": `alpha: {value['alpha']}` at rank {rank} is `scale: {value['alpha'] / rank:g}`"
            if isinstance(value["alpha"], (int, float)) and isinstance(rank, (int, float)) and rank
            else ""
        )
        problems.append(f"`alpha` is PEFT's name; mlx-lm's LoRA multiplier is `scale` (= alpha / rank){example}")
    return _in("lora_parameters", problems)


def schedule_problems(value: Any) -> list[str]:
    """``lr_schedule``: unknown keys, a ``name`` that is no ``mlx.optimizers.schedulers`` function, no ``arguments``."""
    if not isinstance(value, Mapping):
        return []
    import mlx.optimizers.schedulers as schedulers

    names = [n for n, f in vars(schedulers).items() if inspect.isfunction(f) and not n.startswith("_")]
    problems = unknown_keys(value, SCHEDULE_KEYS)
    name = value.get("name")
    if name is None:
        problems.append(f"`name` is missing; set it to an mlx.optimizers.schedulers function ({', '.join(names)})")
    elif name not in names:
        problems.append(
            f"`name: {name}` is not an mlx.optimizers.schedulers function{suggest(str(name), names)}; "
            f"use one of {', '.join(names)}"
        )
    if not isinstance(value.get("arguments"), list):
        problems.append(
            "`arguments` must be the list of the schedule's arguments, the initial learning rate first, "
            "e.g. `arguments: [1e-5, 1000, 1e-7]` for cosine_decay"
        )
    return _in("lr_schedule", problems)


def optimizer_config_problems(value: Any) -> list[str]:
    """``optimizer_config``: ``{optimizer name: {keyword: value}}`` checked against the mlx.optimizers classes."""
    if not isinstance(value, Mapping):
        return []
    import mlx.optimizers as optim

    problems = []
    for name, kwargs in value.items():
        cls_name = OPTIMIZER_CLASSES.get(name)
        if cls_name is None:
            fix = (
                f"write it in lower case, `{str(name).lower()}`: mlx-lm looks the section up by the lower-cased "
                f"optimizer name"
                if str(name).lower() in OPTIMIZER_CLASSES
                else f"{suggest(str(name), OPTIMIZER_CLASSES)}; use one of {', '.join(OPTIMIZER_CLASSES)}"
            )
            problems.append(f"unknown optimizer `{name}`" + (f"; {fix}" if fix.startswith("write") else fix))
            continue
        if not isinstance(kwargs, Mapping):
            problems.append(
                f"`{name}: {kwargs!r}` must be a mapping of keyword arguments, e.g. `{{weight_decay: 0.1}}`"
            )
            continue
        accepted = [p for p in inspect.signature(getattr(optim, cls_name)).parameters if p != "learning_rate"]
        for key in kwargs:
            if key == "learning_rate":
                problems.append(f"`{name}.learning_rate`: set the top-level `learning_rate` (or `lr_schedule`) instead")
            elif key not in accepted:
                problems.append(
                    f"`{name}.{key}` is not an argument of mlx.optimizers.{cls_name}"
                    f"{suggest(key, accepted)}; it takes {', '.join(accepted)}"
                )
    return _in("optimizer_config", problems)


def hf_dataset_problems(value: Any) -> list[str]:
    """``hf_dataset``: one mapping or a list of them, each with a ``path`` and only mlx-lm's keys."""
    if value is None:
        return []
    entries = value if isinstance(value, list) else [value]
    problems = []
    for index, entry in enumerate(entries):
        where = "hf_dataset" if not isinstance(value, list) else f"hf_dataset[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"`{where}` must be a mapping such as `{{path: owner/name, train_split: 'train[:80%]'}}`")
            continue
        found = unknown_keys(entry, HF_DATASET_KEYS)
        if "path" not in entry:
            found.append("`path` is missing; set it to the dataset's Hugging Face id or a local dataset folder")
        problems += _in(where, found)
    return problems


DATA_FORMATS: tuple[tuple[str, tuple[str, ...], type], ...] = (
    ("completions", ("prompt_feature", "completion_feature"), str),
    ("chat", ("chat_feature",), list),
    ("text", ("text_feature",), str),
)
"""mlx-lm's data formats in the order ``create_dataset`` tries them on a file's first row: the
name, the keys naming the row fields it needs (``chat_feature: messages``, ...) and their type."""


def _example(fields: Sequence[str], kind: type) -> str:
    value = '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]' if kind is list else '"..."'
    return "{" + ", ".join(f'"{field}": {value}' for field in fields) + "}"


def row_format(row: Mapping[str, Any], features: Mapping[str, str]) -> Optional[tuple[str, tuple[str, ...], type]]:
    """The format mlx-lm reads a file as, from its first ``row``: ``(name, fields, type)``, or ``None``."""
    for name, keys, kind in DATA_FORMATS:
        fields = tuple(features[key] for key in keys)
        if all(field in row for field in fields):
            return name, fields, kind
    return None


def _bad_rows(path: Path, rows: Sequence[tuple[int, Any]], form: tuple[str, tuple[str, ...], type]) -> list[str]:
    """Rows (after the first) without the fields of the file's format, named by line."""
    name, fields, kind = form
    bad = [(number, row) for number, row in rows if not all(isinstance(row.get(field), kind) for field in fields)]
    if not bad:
        return []
    number, row = bad[0]
    more = f" (also line{'s' if len(bad) > 2 else ''} {', '.join(str(n) for n, _ in bad[1:6])}{'…' if len(bad) > 6 else ''})"
    return [
        f"`{path}` line {number}{more if len(bad) > 1 else ''} is not {name} data: mlx-lm reads the file as {name} "
        f"data from its first line, so every row needs {_example(fields, kind)}; line {number} has "
        f"{', '.join(f'`{key}`' for key in row) or 'no key'}"
    ]


def jsonl_problems(path: Path, features: Mapping[str, str], mask_prompt: bool) -> list[str]:
    """Why ``path`` (one JSON object per line, as mlx-lm reads it) cannot be trained on: by line, with the fix.

    ``features`` maps ``prompt_feature``/``completion_feature``/``chat_feature``/``text_feature``
    to the field names. The first row decides the format, as in mlx-lm's ``create_dataset``;
    every other row must have its fields (mlx-lm reads them lazily, mid-run, with a ``KeyError``).
    """
    lines = path.read_text().splitlines()
    if not any(line.strip() for line in lines):
        return [
            f"`{path}` is empty; it needs one JSON object per line, e.g. "
            f'{{"messages": [{{"role": "user", "content": "..."}}, {{"role": "assistant", "content": "..."}}]}}'
        ]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return [f"`{path}` line {number} is not JSON ({error.msg}); write one JSON object per line, no blank lines"]
        if not isinstance(row, dict):
            return [f"`{path}` line {number} is not a JSON object; write one {{...}} object per line"]
        rows.append((number, row))
    form = row_format(rows[0][1], features)
    if form is None:
        formats = " or ".join(
            f"{_example(tuple(features[k] for k in keys), kind)} ({name})" for name, keys, kind in DATA_FORMATS
        )
        keys = ", ".join(f"`{key}`" for key in rows[0][1]) or "no key"
        return [f"`{path}` line 1 has {keys}, none of mlx-lm's data formats: {formats}"]
    if form[0] == "text" and mask_prompt:
        return [f"`{path}` is text data, which has no prompt to mask; set `mask_prompt: false` or use chat data"]
    return _bad_rows(path, rows, form)


def data_folder_problems(
    data: str, train: bool, test: bool, features: Mapping[str, str], mask_prompt: bool
) -> list[str]:
    """A local data folder: train.jsonl when training, test.jsonl when testing, and every split file readable.

    ``features`` and ``mask_prompt`` as in :func:`jsonl_problems`.
    """
    folder = Path(data).expanduser()
    problems = []
    if train and not (folder / "train.jsonl").is_file():
        problems.append(f"`data: {data}` has no train.jsonl; it needs train.jsonl (and valid.jsonl for evaluation)")
    if test and not (folder / "test.jsonl").is_file():
        problems.append(f"`data: {data}` has no test.jsonl, which `test: true` evaluates; add it or set `test: false`")
    for split in ("train", "valid", "test"):  # mlx-lm reads each file that exists
        file = folder / f"{split}.jsonl"
        if file.is_file():
            problems += jsonl_problems(file, features, mask_prompt)
    return problems
