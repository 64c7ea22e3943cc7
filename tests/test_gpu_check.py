"""``python -m psft_plugin.bench.gpu --device cpu --quick``: the GPU check's own code on the CPU.

One run of the check (tiny model, float32, three real ``axolotl train`` runs, the speed and memory
workers) is shared by the tests. They hold the report's structure and the correctness verdicts,
never a speed or memory figure; one test feeds the check a K = 8 run as if it were K = 1 and
sees it fail, so the verdict can fail.
"""

import json
import subprocess
import sys

import pytest

from psft_plugin.bench import gpu, gpu_axolotl

ITEMS = ["1 correctness", "2 speed", "3 memory", "4 multi-gpu"]


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """``(exit code, stdout, report, work folder)`` of one quick CPU run of the check."""
    work = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(
        [sys.executable, "-m", "psft_plugin.bench.gpu", "--device", "cpu", "--quick", "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert (work / "report.json").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return done.returncode, done.stdout, json.loads((work / "report.json").read_text()), work


@pytest.mark.e2e
def test_report_has_every_item_with_a_verdict_line(check):
    code, stdout, report, _ = check
    assert code == 0 and report["failed"] == []
    assert list(report["items"]) == ITEMS
    lines = [line for line in stdout.splitlines() if line.startswith(tuple(f"[{name}] " for name in ITEMS))]
    assert [line.split("]")[0][1:] for line in lines] == ITEMS
    for line, (name, item) in zip(lines, report["items"].items()):
        assert item["status"] in {"pass", "fail", "measured", "skipped"}
        assert line == f"[{name}] {item['status'].upper()}: {item['verdict']}"
    assert report["machine"]["dtype"] == "float32" and "float32" in report["machine"]["note"]
    assert report["items"]["4 multi-gpu"]["status"] == "skipped"
    assert "needs 2 or more CUDA devices" in report["items"]["4 multi-gpu"]["verdict"]


@pytest.mark.e2e
def test_k1_matches_ce_and_k8_clips_after_each_window_start(check):
    item = check[2]["items"]["1 correctness"]
    assert item["status"] == "pass" and not item["failed_runs"]
    pair, tol = item["k1_vs_ce"]["sdpa"], item["tolerance"]
    assert pair["steps"] == [16, 16] and pair["k1_fresh_every_step"]
    assert pair["nll_rel_diff"] <= tol["nll"] and pair["update_rel_diff"] <= tol["update"]
    packed = item["k8_packed"]
    assert packed["first_steps"] == [0.0, 0.0] and min(packed["later_max"]) > 0
    assert item["control_k8_vs_ce_update_rel_diff"] > 100 * tol["update"]  # the tolerance separates objectives


@pytest.mark.e2e
def test_the_comparison_fails_for_a_different_objective(check):
    """The K = 8 run's log and weights in place of K = 1's: the same comparison must reject them."""
    report, work = check[2], check[3]
    root = work / "correctness"

    def run(name):
        return gpu_axolotl.Run(name, root / name / "out", (root / name / "train.log").read_text(), 0, 0.0)

    lane = gpu_axolotl.Lane("cpu", "float32", work / "tiny" / "model", work / "tiny" / "data", 16, 2, 128, 1e-2)
    start = gpu_axolotl.load_weights(root / "start_adapter", "adapter_model.safetensors")
    assert gpu_axolotl.compare_to_ce(lane, run("ce-sdpa"), run("k1-sdpa"), start)["ok"]
    wrong = gpu_axolotl.compare_to_ce(lane, run("ce-sdpa"), run("k8-packed"), start)
    assert not wrong["ok"] and not wrong["k1_fresh_every_step"] and wrong["update_rel_diff"] > 1e-2
    assert report["items"]["1 correctness"]["tolerance"] == gpu_axolotl.tolerances(lane)


@pytest.mark.parametrize(
    "argv, message",
    [(["--device", "cuda"], "torch sees no CUDA device"), (["--device", "cpu"], "--device cpu needs --quick")],
)
def test_a_run_that_cannot_work_here_is_a_clear_error(argv, message, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        gpu.parse_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
