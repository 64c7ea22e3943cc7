"""``psft-llamafactory train`` refuses bad input before anything loads: the key, the fix, exit status 2.

The cases run the entry point in-process (validation loads no model and writes nothing); one runs
the installed script, to show the user sees no traceback. Each case is the tiny run's valid YAML
with one change, so the problem reported is that change's.
"""

from __future__ import annotations

import subprocess
from importlib import metadata

import pytest
import yaml
from llamafactory_runs import BIN, config

from psft_plugin.integrations.llamafactory import cli

# Only where LLaMA-Factory is installed (the hosts line); deselected on the others.
pytestmark = pytest.mark.requires("llamafactory")

CASES = {
    "misspelt LLaMA-Factory key": (dict(lora_rnak=8), ["unknown key `lora_rnak` (did you mean `lora_rank`?)"]),
    "misspelt PSFT key": (
        dict(loss="psft", psft_refresh_step=2),
        ["unknown key `psft_refresh_step` (did you mean `psft_refresh_steps`?)"],
    ),
    "unknown objective": (dict(loss="pfst"), ["pfst", "psft"]),
    "out of bounds": (dict(loss="psft", psft_refresh_steps=0), ["`psft_refresh_steps: 0` is out of range"]),
    "PSFT key under loss: ce": (
        dict(loss="ce", psft_refresh_steps=4),
        ["`psft_refresh_steps` has no effect with `loss: ce`; set `loss: psft` or remove `psft_refresh_steps`"],
    ),
    "PSFT key without loss": (dict(psft_epsilon_high=0.3), ["`loss` is not set"]),
    "use_dft_loss beside loss": (
        dict(loss="psft", use_dft_loss=True),
        ["`use_dft_loss` and `loss:` both choose the loss; remove `use_dft_loss`"],
    ),
    "use_eaft_loss beside loss": (dict(loss="dft", use_eaft_loss=True), ["`use_eaft_loss` and `loss:`"]),
    "use_asft_loss beside loss": (dict(loss="ce", use_asft_loss=True), ["`use_asft_loss` and `loss:`"]),
    "liger kernel": (
        dict(loss="psft", enable_liger_kernel=True),
        ["`enable_liger_kernel: true`", "set `enable_liger_kernel: false`", "psft_lm_head_chunk_size"],
    ),
    "stage other than sft": (dict(loss="psft", stage="pt"), ["`stage: pt`", "set `stage: sft`"]),
    "LLaMA-Factory's own check": (
        dict(loss="psft", dataset=None),
        ["LLaMA-Factory: Please specify dataset for training."],
    ),
}


def _write(tmp_path, lf_assets, **overrides) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(*lf_assets, tmp_path, **overrides)))
    return str(path)


@pytest.fixture
def in_process(monkeypatch):
    """Run :func:`cli.main` as the script does; LLaMA-Factory's version check off as the script sets it."""
    monkeypatch.setenv("DISABLE_VERSION_CHECK", "1")
    return cli.main


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_with_the_key_and_the_fix(case, in_process, lf_assets, tmp_path, capsys):
    overrides, expected = CASES[case]
    status = in_process(["train", _write(tmp_path, lf_assets, **overrides)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "psft-llamafactory: invalid configuration:" in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_every_problem_is_reported_at_once(in_process, lf_assets, tmp_path, capsys):
    path = _write(tmp_path, lf_assets, loss="psft", psft_epsilon_high=-1, lora_rnak=8, stage="rm")
    assert in_process(["train", path]) == 2
    err = capsys.readouterr().err
    for text in ("`psft_epsilon_high: -1` is out of range", "`lora_rnak`", "`stage: rm`"):
        assert text in err


@pytest.mark.parametrize("variable", ["USE_RAY", "USE_MCA"])
def test_launch_modes_without_the_trainer_are_refused(variable, in_process, lf_assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(cli, "launches_workers", lambda: False)  # the check, not the launch
    assert in_process(["train", _write(tmp_path, lf_assets, loss="psft")]) == 2
    assert f"environment variable {variable}=1" in capsys.readouterr().err


def test_an_untested_llamafactory_release_is_refused(in_process, lf_assets, tmp_path, capsys, monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.9.6" if name == "llamafactory" else real(name))
    assert in_process(["train", _write(tmp_path, lf_assets, loss="psft")]) == 2
    err = capsys.readouterr().err
    assert "tested with llamafactory >=0.9.5,<0.9.6 and found 0.9.6" in err


def test_a_missing_file_and_a_bad_command_are_reported(in_process, tmp_path, capsys):
    assert in_process(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert in_process(["export", "cfg.yaml"]) == 2
    assert "usage: psft-llamafactory train" in capsys.readouterr().err


@pytest.mark.e2e
def test_the_script_reports_without_a_traceback(lf_assets, tmp_path):
    path = _write(tmp_path, lf_assets, loss="psft", psft_refresh_steps=0)
    done = subprocess.run([str(BIN / "psft-llamafactory"), "train", path], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "`psft_refresh_steps: 0` is out of range" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()
