"""Few-step versions of the main job (the demo) and of the benchmark, through their real CLIs."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_LINE = re.compile(r"^psft/sft step-time ratio=(\d+\.\d+) \(bound (\d+\.\d+)\); peak-mem ratio=(\d+\.\d+)$")


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.mark.e2e
def test_bench_quick_reports_ratios_and_logprob_memory(tmp_path):
    """The report's structure, not its figures: speed and memory are the benchmark's to judge."""
    out = tmp_path / "bench.json"
    lines = _run("-m", "psft_plugin.bench", "--quick", "--out", str(out)).strip().splitlines()
    ratio, bound, peak = map(float, SUMMARY_LINE.match(lines[-1]).groups())
    assert lines[-2].startswith("mlx (model): psft/sft step-time ratio=")
    report = json.loads(out.read_text())
    for backend in ("torch", "mlx"):
        summary = report["summary"][backend]
        assert {"bound", "step_time_ratio", "peak_mem_ratio"} <= summary.keys()
        assert all(math.isfinite(summary[key]) for key in ("bound", "step_time_ratio", "peak_mem_ratio"))
    assert report["summary"]["torch"]["step_time_ratio"] == pytest.approx(ratio, abs=1e-3)
    assert report["summary"]["torch"]["bound"] == pytest.approx(bound, abs=1e-3)
    assert report["summary"]["torch"]["peak_mem_ratio"] == pytest.approx(peak, abs=1e-3)
    measured = {(r["backend"], r["path"]) for r in report["logprob"] if r["peak_bytes"] > 0}
    assert {("torch", "naive"), ("torch", "ours"), ("torch", "chunked")} <= measured


@pytest.mark.e2e
def test_demo_quick_trains_both_runs_and_reports(tmp_path):
    """torch on SmolLM2 itself (the MLX backend runs the tiny model with DFT added, below)."""
    output = _run("-m", "psft_plugin.demo", "--quick", "--backend", "torch", "--out", str(tmp_path))
    lines = output.strip().splitlines()
    assert lines[-1].startswith("plot: ") and Path(lines[-1][6:]).stat().st_size > 10_000
    table = lines[lines.index(next(line for line in lines if line.startswith("model "))) :][:4]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert set(rows) == {"base", "SFT", "PSFT"}
    for name in ("SFT", "PSFT"):
        nll, entropy, ood = map(float, rows[name][:3])
        assert 0 < nll < 12 and 0 < entropy < 12 and 0 < ood < 12  # nats: below ln(vocab) + a margin
        assert nll < float(rows["base"][0])  # two steps at this learning rate already fit the math
    assert not math.isnan(float(rows["PSFT"][3]))  # PSFT logged its clip fraction
    assert "At the same number of steps" in output


def test_demo_objectives_default_to_sft_vs_psft_and_bad_lists_are_usage_errors(capsys):
    from psft_plugin.demo.__main__ import DEFAULT_OBJECTIVES, main, parse_objectives

    assert DEFAULT_OBJECTIVES == ("ce", "psft") and parse_objectives("ce, psft,dft") == ("ce", "psft", "dft")
    for bad, words in (("ce,dtf", "`dtf` is not one of ce, psft, dft"), ("ce,ce", "names an objective twice")):
        with pytest.raises(SystemExit) as error:
            main(["--objectives", bad])
        assert error.value.code == 2 and words in capsys.readouterr().err


def test_demo_verdict_names_the_run_it_compares_with_sft():
    from psft_plugin.demo.report import verdict

    sft = {"in_domain_nll": 1.0, "ood_nll": 2.0, "in_domain_entropy": 0.5}
    other = {"in_domain_nll": 0.9, "ood_nll": 2.1, "in_domain_entropy": 0.4}
    assert verdict(sft, other) == verdict(sft, other, "PSFT")
    assert "in-domain NLL: PSFT 0.9000 vs SFT 1.0000 (PSFT lower)" in verdict(sft, other)
    assert "out-of-domain NLL: DFT 2.1000 vs SFT 2.0000 (SFT lower)" in verdict(sft, other, "DFT")


@pytest.mark.e2e
def test_demo_quick_with_dft_adds_the_third_run(tmp_path, tiny_assets):
    """`--objectives ce,psft,dft` on the MLX backend and the tiny model (MLX's Linux CPU matmul runs
    SmolLM2 ~30x slower than torch): the SFT and PSFT rows, a DFT row and a verdict line each."""
    output = _run(
        "-m",
        "psft_plugin.demo",
        "--quick",
        "--backend",
        "mlx",
        "--out",
        str(tmp_path),
        "--model",
        str(tiny_assets[0]),
        "--objectives",
        "ce,psft,dft",
    )
    lines = output.strip().splitlines()
    assert lines[-1].startswith("plot: ") and lines[-1].endswith("sft_vs_psft_vs_dft.png")
    assert Path(lines[-1][6:]).stat().st_size > 10_000
    table = lines[lines.index(next(line for line in lines if line.startswith("model "))) :][:5]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert list(rows) == ["base", "SFT", "PSFT", "DFT"]
    for name in ("SFT", "PSFT", "DFT"):
        nll, entropy, ood = map(float, rows[name][:3])
        assert 0 < nll < float(rows["base"][0]) and 0 < entropy < 12 and 0 < ood < 12
    assert not math.isnan(float(rows["PSFT"][3]))  # PSFT logged its clip fraction
    assert rows["DFT"][3] == "-" and rows["DFT"][:3] != rows["SFT"][:3]  # no clip fraction; not SFT's model
    verdicts = [line for line in lines if line.startswith("At the same number of steps")]
    assert len(verdicts) == 2 and "PSFT " in verdicts[0] and "DFT " in verdicts[1]
