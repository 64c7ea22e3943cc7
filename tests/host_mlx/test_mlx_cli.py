"""The CLI as an `mlx_lm.lora` user meets it: reporting services and user mistakes that end with a
sentence (exit 2), never a traceback. Eval-only runs and failed starts: test_mlx_lora_meaning.py."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from psft_plugin import mlx_train
from psft_plugin.mlx_train.config import resolve_config
from psft_plugin.mlx_train.run import ADAPTER_FILE, run, start_notes

TINY_YAML = "configs/mlx/tiny.yaml"


def _config(tiny, out: Path, **values):
    model, data = tiny
    return resolve_config(
        {
            "model": str(model),
            "data": str(data),
            "adapter_path": str(out),
            "train": True,
            "batch_size": 4,
            "iters": 4,
            "num_layers": -1,
            "loss": "psft",
            "val_batches": 1,
            "steps_per_report": 2,
            "steps_per_eval": 100,
            "save_every": 100,
            **values,
        }
    )


class StandIn(types.ModuleType):
    """A ``wandb`` / ``swanlab`` module that records ``init`` and ``log`` calls."""

    def __init__(self, name):
        super().__init__(name)
        self.inits, self.logs = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def log(self, data, step=None):
        self.logs.append((step, data))


def test_report_to_goes_through_mlx_lm_callbacks_with_the_psft_metrics(tiny, tmp_path, monkeypatch):
    import mlx_lm.tuner.callbacks as callbacks

    wandb, swanlab = StandIn("wandb"), StandIn("swanlab")
    for name, module in (("wandb", wandb), ("swanlab", swanlab)):  # installed, as far as the check and mlx-lm know
        monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(callbacks, name, module)
    run(_config(tiny, tmp_path / "a", report_to="wandb,swanlab", project_name="psft-test"), log=lambda line: None)
    assert wandb.inits[0]["project"] == swanlab.inits[0]["project"] == "psft-test"
    assert wandb.inits[0]["dir"] == str(tmp_path / "a") and wandb.inits[0]["config"]["loss"] == "psft"
    train_logs = [(step, data) for step, data in wandb.logs if "train_loss" in data]
    assert [step for step, _ in train_logs] == [2, 4] and swanlab.logs == wandb.logs
    assert {
        "psft/nll",
        "psft/clipfrac",
        "psft/ratio_mean",
        "psft/approx_kl",
        "tokens_per_second",
        "trained_tokens",
        "peak_memory",
        "iterations_per_second",
    } <= set(train_logs[-1][1])
    assert any("val_loss" in data for _, data in wandb.logs)


def test_steps_without_a_response_token_are_reported_once_with_their_count(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    long_prompt = " ".join(["what is one plus one"] * 12)
    rows = [{"prompt": long_prompt, "completion": "two."}] * 8 + [{"prompt": "1 + 1?", "completion": "two."}] * 8
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    records = run(
        _config(tiny, tmp_path / "a", data=str(data), mask_prompt=True, max_seq_length=24, iters=8, steps_per_report=1),
        log=lines.append,
    )
    empty = sum(r["tokens"] == 0 for r in records)
    assert 0 < empty < len(records)
    warnings = [line for line in lines if "had no response token" in line]
    assert warnings == [warnings[0]] and warnings[0].startswith(f"warning: {empty} of {len(records)} optimizer steps")
    reports = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in reports if r["kind"] == "train"]
    assert len(train) == len(records) - empty and all(r["train_loss"] != 0.0 for r in train)


def _bad_inputs(tiny, tmp_path) -> dict[str, tuple[list[str], list[str]]]:
    model, data = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: x\nlora_parameters: {rank: 8\n")
    hf = tmp_path / "hf.yaml"
    hf.write_text(f"model: {model}\nhf_dataset: {{path: owner/set, train_splt: 'train[:80%]'}}\n")
    base = [
        "--model",
        str(model),
        "--data",
        str(data),
        "--adapter-path",
        str(tmp_path / "out"),
        "--train",
        "--num-layers",
        "-1",
    ]
    return {
        "empty train.jsonl": (base + ["--data", str(empty)], ["train.jsonl` is empty", "one JSON object per line"]),
        "broken YAML": (["--config", str(broken)], ["is not valid YAML", "line 3", "fix the syntax"]),
        "hub model id offline": (
            base + ["--model", "no-such-owner/no-such-model"],
            [
                "`model: no-such-owner/no-such-model` is not a local folder",
                "taken as a Hugging Face id",
                "fetching it failed",
                "check the path",
            ],
        ),
        "hub data id offline": (
            base + ["--data", "no-such-owner/no-such-data"],
            ["`data: no-such-owner/no-such-data` is not a local folder", "fetching it failed"],
        ),
        "hf_dataset subkey": (
            ["--config", str(hf)],
            ["in `hf_dataset`: unknown key `train_splt` (did you mean `train_split`?)"],
        ),
    }


IN_PROCESS = ("hub model id offline", "hub data id offline")
"""Cases that fail only after mlx-lm is imported: run through the CLI's ``main`` in this process (the
same exit path the other cases take through a subprocess), which saves two process starts."""


@pytest.mark.e2e
def test_user_mistakes_exit_2_with_the_fix_and_no_traceback(run_cli, tiny, tmp_path, capsys):
    for case, (args, words) in _bad_inputs(tiny, tmp_path).items():
        if case in IN_PROCESS:  # an exception other than ConfigError would fail the test here
            status, out = mlx_train.main(args), capsys.readouterr()
            result = subprocess.CompletedProcess(args, status, out.out, out.err)
        else:
            result = run_cli(*args)
        assert result.returncode == 2, (case, result.stdout[-2000:], result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, case
        for word in words:
            assert word in result.stderr, (case, word, result.stderr)


@pytest.mark.parametrize(
    "earlier_adapters, resume, said",
    [(True, False, True), (False, False, False), (True, True, False)],
    ids=["into-earlier-adapters", "into-a-fresh-folder", "resuming"],
)
def test_training_into_an_earlier_runs_adapters_says_it_replaces_them(tmp_path, earlier_adapters, resume, said):
    """Asked to train into a folder that holds adapters, the run says before writing that it replaces them."""
    if earlier_adapters:
        (tmp_path / ADAPTER_FILE).write_bytes(b"earlier")
    resume_file = str(tmp_path / ADAPTER_FILE) if resume else None
    cfg = types.SimpleNamespace(
        grad_accumulation_steps=1, iters=4, adapter_path=str(tmp_path), resume_adapter_file=resume_file
    )
    lines: list[str] = []
    start_notes(cfg, lines.append)
    text = " ".join(" ".join(lines).split())
    assert ("holds an earlier run's adapters: this run trains into it, replacing them" in text) == said
    assert (tmp_path / ADAPTER_FILE).exists() == earlier_adapters  # nothing written by the notes
