"""``psft-swift sft [CONFIG.yaml|json] [--flag value ...]``: validate the objective, then run ``swift sft``.

The command line is ms-swift's, expanded as ms-swift expands it (a positional config file
becomes ``--key value`` flags, its ``ENV`` mapping environment variables). ``--loss_type``
naming a registered objective and every option of the objective registry (``--psft_*`` and
third-party keys, values read as YAML scalars) are this module's; every other flag goes to
ms-swift unchanged, which rejects its own typos as ``swift sft`` does. A command line without
any of ours runs plain ``swift sft``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from psft_plugin.config import KEY_PREFIX, LOSS_OPTION, resolve
from psft_plugin.integrations.swift.environment import CONFIG_ENV
from psft_plugin.objectives import LM_HEAD_CHUNK_KEY
from psft_plugin.options import ConfigError
from psft_plugin.registry import default_registry

PROG = "psft-swift"
LOSS_FLAG = "loss_type"
PLUGINS_FLAG = "external_plugins"
PLUGIN_FILE = str(Path(__file__).with_name("plugin.py"))
REFUSED_COMMANDS = {
    "rlhf": "RLHF stages (DPO, GRPO, KTO, ...) have their own losses",
    "pt": "use `sft` (PSFT trains the response tokens of chat data)",
    "megatron": "Megatron-SWIFT has its own loss and trainer, which the old-policy window is not wired into",
}
# ms-swift flags whose setting (anything but these values) PSFT cannot train with: flag -> (kept values, fix).
REFUSED_FLAGS = {
    "use_liger_kernel": (
        {"false"},
        "Liger's fused linear cross-entropy returns no logits; use "
        f"`--{LM_HEAD_CHUNK_KEY} 1024` for the memory (no [B, T, V] logits either)",
    ),
    "enable_dft_loss": ({"false"}, "ms-swift's DFT replaces the loss; use `--loss_type dft` instead"),
    "enable_channel_loss": ({"false"}, "channel loss weighs tokens by ms-swift's own per-token loss; remove it"),
    "sequence_parallel_size": (
        {"1"},
        "sequence parallel splits a sequence across ranks, which the old-policy "
        "pass is not wired into; use data parallel (`NPROC_PER_NODE`)",
    ),
    "task_type": ({"causal_lm"}, "PSFT trains causal language models; remove `--task_type`"),
    "loss_scale": ({"default"}, "per-token loss weights are not part of the objective; use `--loss_scale default`"),
    "label_smoothing_factor": ({"0", "0.0"}, "label smoothing is not part of the objective; remove it"),
    "tuner_backend": ({"peft"}, "Unsloth's models return no usable logits here; use `--tuner_backend peft`"),
}


def flags(argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``[(name, values), ...]`` of ``--name v1 v2`` / ``--name=v`` items, in order (a flag may repeat)."""
    parsed: list[tuple[str, list[str]]] = []
    for item in argv:
        if item.startswith("--"):
            name, eq, value = item[2:].partition("=")
            parsed.append((name, [value] if eq else []))
        elif parsed:
            parsed[-1][1].append(item)
        else:
            raise ConfigError([f"`{item}`: expected `--flag value` (or a config file as the first argument)"])
    return parsed


def split(parsed: list[tuple[str, list[str]]]) -> tuple[dict[str, Any], list[tuple[str, list[str]]]]:
    """``(our configuration, ms-swift's flags)``: ``loss`` (if ``--loss_type`` names an objective) and our options."""
    registry = default_registry()
    options, ours, theirs = registry.options(), {}, []
    for name, values in parsed:
        value = " ".join(values)
        if name == LOSS_FLAG and value in registry.names():
            ours[LOSS_OPTION.key] = value
        elif name in options or name.startswith(KEY_PREFIX):
            ours[name] = yaml.safe_load(value) if values else True
        else:
            theirs.append((name, values))
    return ours, theirs


def swift_problems(theirs: list[tuple[str, list[str]]], loss: str) -> list[str]:
    """The ms-swift settings ``--loss_type loss`` cannot train with, each with its fix."""
    given = {name: " ".join(values) for name, values in theirs}
    problems = [
        f"`--{flag} {given[flag]}` cannot train `--loss_type {loss}`: {fix}"
        for flag, (kept, fix) in REFUSED_FLAGS.items()
        if flag in given and given[flag].lower() not in kept
    ]
    if LOSS_FLAG in given:
        problems.append(f"`--loss_type` is given twice (`{loss}` and `{given[LOSS_FLAG]}`); keep one")
    return problems


def swift_argv(config: dict[str, Any], theirs: list[tuple[str, list[str]]]) -> list[str]:
    """ms-swift's command line: its flags, ``--loss_type``, our plugin added to ``--external_plugins``."""
    argv, plugins = [], [PLUGIN_FILE]
    for name, values in theirs:
        if name == PLUGINS_FLAG:
            plugins += values
        else:
            argv += [f"--{name}", *values]
    if (config.get(LM_HEAD_CHUNK_KEY) or 0) > 0 and "use_logits_to_keep" not in dict(theirs):
        argv += ["--use_logits_to_keep", "false"]  # the chunked head computes the response positions itself
    return [*argv, f"--{LOSS_FLAG}", config[LOSS_OPTION.key], f"--{PLUGINS_FLAG}", *plugins]


def prepare(argv: list[str]) -> Optional[list[str]]:
    """ms-swift's ``sft`` command line for ``argv`` (after ``sft``), or ``None`` when none of it is ours.

    Sets :data:`CONFIG_ENV` to the validated configuration. Raises :class:`ConfigError`.
    """
    from swift.cli.main import parse_yaml_args

    parse_yaml_args(argv)  # ms-swift's own expansion of a positional config file
    ours, theirs = split(flags(argv))
    if not ours:
        return None
    loss = ours.get(LOSS_OPTION.key, LOSS_OPTION.default)
    problems = swift_problems(theirs, loss) if LOSS_OPTION.key in ours else []
    if LOSS_OPTION.key in ours and dict(theirs).get("use_logits_to_keep", [""])[0:1] == ["true"]:
        if (ours.get(LM_HEAD_CHUNK_KEY) or 0) > 0:
            problems.append(f"`--use_logits_to_keep true` with `--{LM_HEAD_CHUNK_KEY}`: remove `--use_logits_to_keep`")
    resolve(ours, closed=True, host_problems=problems)
    if LOSS_OPTION.key not in ours:  # options without an objective: resolve named them; never train CE silently
        raise ConfigError([f"`--{LOSS_FLAG}` is not one of {', '.join(default_registry().names())}"])
    os.environ[CONFIG_ENV] = json.dumps(ours)
    return swift_argv(ours, theirs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``psft-swift sft ...``: 2 on a configuration error (printed with every fix), else ``swift sft``'s status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command != "sft":
        reason = REFUSED_COMMANDS.get(command.split("-")[0], "the only command is `sft`")
        print(
            f"{PROG}: `{command or '(none)'}` is not supported: {reason}. Usage: {PROG} sft [config] --flag value ...",
            file=sys.stderr,
        )
        return 2
    rest = argv[1:]
    try:
        swift = prepare(rest)
    except ConfigError as error:
        print(
            f"{PROG}: {error}\n(`loss` is the `--{LOSS_FLAG}` flag here; other keys are flags of the same name)",
            file=sys.stderr,
        )
        return 2
    from swift.cli.main import cli_main

    sys.argv = ["swift", "sft", *(rest if swift is None else swift)]
    cli_main()  # runs `swift/cli/sft.py` (under torchrun with NPROC_PER_NODE); exits with its status on failure
    return 0
