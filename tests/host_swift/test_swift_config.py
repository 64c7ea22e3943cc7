"""``psft-swift``'s own checks: each bad input stops before ms-swift starts, naming the key and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.requires("ms-swift")

from psft_plugin.integrations.swift import cli  # noqa: E402
from psft_plugin.integrations.swift.environment import CONFIG_ENV  # noqa: E402

BASE = ["--model", "m", "--dataset", "d.jsonl", "--tuner_type", "lora"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--loss_type", "psft", "--psft_refresh_step", "8"],
            ["`psft_refresh_step`", "did you mean `psft_refresh_steps`"],
        ),
        (["--loss_type", "psft", "--psft_refresh_steps", "0"], ["psft_refresh_steps: 0", "must be >= 1"]),
        (["--loss_type", "psft", "--psft_refresh_steps", "two"], ["psft_refresh_steps: 'two'", "must be an int"]),
        (["--loss_type", "ce", "--psft_refresh_steps", "4"], ["`psft_refresh_steps` has no effect", "psft"]),
        (["--loss_type", "cross_entropy", "--psft_epsilon_high", "0.3"], ["`psft_epsilon_high` has no effect"]),
        (["--loss_type", "psft", "--use_liger_kernel", "true"], ["--use_liger_kernel true", "psft_lm_head_chunk_size"]),
        (["--loss_type", "psft", "--sequence_parallel_size", "2"], ["--sequence_parallel_size 2", "NPROC_PER_NODE"]),
        (["--loss_type", "psft", "--enable_dft_loss", "true"], ["--enable_dft_loss true", "--loss_type dft"]),
        (["--loss_type", "psft", "--loss_scale", "last_round"], ["--loss_scale last_round", "default"]),
    ],
)
def test_bad_input_stops_with_the_key_and_the_fix(capsys, argv, expected):
    assert cli.main(["sft", *BASE, *argv]) == 2
    error = capsys.readouterr().err
    assert all(text in error for text in expected), error
    assert CONFIG_ENV not in os.environ


@pytest.mark.parametrize("command", ["rlhf", "pt", "megatron", ""])
def test_other_commands_are_refused_by_name(capsys, command):
    assert cli.main([command, *BASE] if command else []) == 2
    assert f"`{command or '(none)'}` is not supported" in capsys.readouterr().err


def test_the_command_line_for_ms_swift(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("model: m\nloss_type: psft\npsft_refresh_steps: 4\npsft_epsilon_high: 0.3\n")
    argv = cli.prepare([str(config), "--external_plugins", "mine.py", "--psft_lm_head_chunk_size", "64"])
    assert json.loads(os.environ[CONFIG_ENV]) == {
        "loss": "psft",
        "psft_refresh_steps": 4,
        "psft_epsilon_high": 0.3,
        "psft_lm_head_chunk_size": 64,
    }
    assert argv == [
        "--model", "m", "--use_logits_to_keep", "false", "--loss_type", "psft",
        "--external_plugins", cli.PLUGIN_FILE, "mine.py",
    ]  # fmt: skip
    assert cli.prepare(["--model", "m", "--loss_type", "cross_entropy"]) is None  # not ours: swift sft as given


def test_a_bad_config_file_exits_non_zero_without_a_traceback(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("model: m\nloss_type: psft\npsft_epsilon_hgh: 0.3\n")
    done = subprocess.run(
        [str(Path(sys.executable).with_name("psft-swift")), "sft", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "`psft_epsilon_hgh` (did you mean `psft_epsilon_high`?)" in done.stderr, done.stderr
