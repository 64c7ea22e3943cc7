"""Issue 18 through the real CLI: `mlx_lm.lora`'s keys mean the same, and nothing a user has is lost.

The session's ``lora_run`` (the tiny YAML, ``iters: 9`` at GA 2, an 80-column terminal) is shared:
a resume from its iteration-4 checkpoint (with ``val_batches: 0``), a ``--test``-only run and a
failed start all point at it, and the last two must leave it byte-identical.
"""

import hashlib
import importlib.util
import json
import math

import mlx.core as mx
import pytest
from mlx_runs import COLUMNS, LORA_FLAGS, TINY_YAML, reports, run_cli, train_cli

from psft_plugin.mlx_train.config import resolve_config
from psft_plugin.mlx_train.run import load_data, make_evaluate

pytestmark = pytest.mark.e2e


def snapshot(folder) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def train_rows(stdout: str) -> list[list[str]]:
    """The console's report rows, split into columns (iteration, loss, nll, arrow, ...)."""
    rows = [line.split() for line in stdout.splitlines() if line[:7].strip().isdigit()]
    return [row for row in rows if len(row) > 3 and row[3] in ("▼", "▲")]


@pytest.fixture(scope="module")
def resumed(lora_run, tiny, tmp_path_factory):
    """``(adapter_dir, stdout)``: ``lora_run``'s flags with ``--iters 4`` from its iteration-4 checkpoint."""
    out = tmp_path_factory.mktemp("resumed") / "adapters"
    checkpoint = lora_run[0] / "0000004_adapters.safetensors"
    flags = ("--iters", "4", "--resume-adapter-file", str(checkpoint), "--val-batches", "0")
    return out, train_cli(tiny, out, *LORA_FLAGS, *flags)


def test_the_bar_reaches_100_percent_and_the_dropped_iteration_is_said_once(lora_run):
    out, stdout = lora_run
    assert "100% ·     8/8" in stdout and "8/9" not in stdout
    assert " ".join(stdout.split()).count("`iters: 9` is not a multiple of `grad_accumulation_steps: 2`") == 1
    assert [r["iteration"] for r in reports(out, "train")] == [2, 4, 6, 8]


def test_deliberate_differences_from_mlx_lm_are_said_once_at_the_start(lora_run):
    _, stdout = lora_run
    notes = " ".join(stdout.split("Trainable parameters")[0].split())
    assert stdout.count("unlike mlx_lm.lora, on purpose") == 1 and "unlike mlx_lm.lora" in notes
    assert "only response tokens count in the loss" in notes and "micro-batch means" in notes  # GA 2


def test_an_empty_evaluation_is_nan_with_the_reason_in_the_console_and_metrics(resumed):
    out, stdout = resumed
    (val,) = reports(out, "val")
    assert val["iteration"] == 8 and math.isnan(val["val_loss"]) and val["val_tokens"] == 0
    assert "`val_batches: 0` evaluates no batch" in val["note"]
    (row,) = [line.split() for line in stdout.splitlines() if line.split()[:2] == ["8", "val"]]
    assert row[:3] == ["8", "val", "nan"]
    assert " ".join(stdout.split()).count("val loss is nan: `val_batches: 0` evaluates no batch") == 1


def test_console_rows_fit_80_columns(lora_run):
    out, stdout = lora_run
    long = [line for line in stdout.splitlines() if len(line) > COLUMNS and str(out.parent) not in line]
    assert not long, long  # a line naming the output folder may be as long as its path
    assert len(train_rows(stdout)) == 4


def test_resume_trains_iters_more_as_mlx_lm_and_continues_the_counters(lora_run, resumed):
    """From the iteration-4 checkpoint with `--iters 4`: 4 more iterations (mlx_lm.lora's meaning), which
    land exactly on the uninterrupted run; iteration numbers and trained_tokens continue."""
    (out, _), (again, stdout) = lora_run, resumed
    assert "training `iters: 4` more iterations, to 8, as mlx_lm.lora counts" in " ".join(stdout.split())
    whole, ours = reports(out, "train"), reports(again, "train")
    assert [r["iteration"] for r in ours] == [6, 8] == [r["iteration"] for r in whole[2:]]
    assert [r["trained_tokens"] for r in ours] == pytest.approx([r["trained_tokens"] for r in whole[2:]])
    assert ours[0]["trained_tokens"] > whole[1]["trained_tokens"] > 0
    assert "100% ·     8/8" in stdout
    a, b = (mx.load(str(folder / "adapters.safetensors")) for folder in (out, again))
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    assert {p.name for p in again.glob("0*_adapters.safetensors")} == {"0000008_adapters.safetensors"}


def test_test_alone_evaluates_the_adapters_and_writes_nothing(lora_run, tiny):
    """mlx-lm's "test my adapters" command: `train` is off unless asked for, as in mlx_lm.lora."""
    from mlx_lm import load

    out, _ = lora_run
    model, data = tiny
    before = snapshot(out)
    result = run_cli(
        "--model", str(model), "--adapter-path", str(out), "--data", str(data), "--test", "--num-layers", "2"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert snapshot(out) == before and "Training" not in result.stdout
    loaded, tokenizer = load(str(model), adapter_path=str(out))
    cfg = resolve_config({"model": str(model), "data": str(data), "test": True, "adapter_path": str(out)})
    expected, tokens = make_evaluate(load_data(cfg, tokenizer)[2], cfg, cfg.test_batches)(loaded)
    assert tokens > 0 and f"Test loss {expected:.3f}, Test ppl {math.exp(expected):.3f}." in result.stdout


def test_a_failed_start_leaves_the_output_folder_byte_identical(lora_run, tiny, tmp_path):
    """Every check runs before a file of `adapter_path` is touched: the configuration, each data row (a bad
    one at line 30 is named), the `report_to` packages, the model's layers."""
    assert importlib.util.find_spec("swanlab") is None, "this test's environment has swanlab absent"
    out, _ = lora_run
    model, data = tiny
    before = snapshot(out)
    bad = tmp_path / "data"
    bad.mkdir()
    for split in ("valid", "test"):
        (bad / f"{split}.jsonl").write_text((data / f"{split}.jsonl").read_text())
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[29] = json.dumps({"question": "What is 2 plus 3?", "answer": "5"})
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(TINY_YAML.read_text() + "warmup_steps: 10\n")
    result = run_cli(
        *("--config", str(config), "--model", str(model), "--adapter-path", str(out), "--data", str(bad)),
        *("--report-to", "swanlab", "--num-layers", "99"),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    for words in (
        f"`{bad / 'train.jsonl'}` line 30 is not chat data",
        '"messages": [{"role": "user"',
        "line 30 has `question`, `answer`",
        "swanlab is not installed; `pip install swanlab`",
        "unknown key `warmup_steps`: mlx-lm's learning-rate warm-up is `warmup` in `lr_schedule`",
        "`num_layers: 99` but the model has 2 layers",
    ):
        assert words in " ".join(result.stderr.split()), (words, result.stderr)
    assert "did you mean `psft_warmup_steps`" not in result.stderr
    assert snapshot(out) == before
