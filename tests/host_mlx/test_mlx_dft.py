"""``loss: dft`` through the real ``python -m psft_plugin.mlx_train`` on the tiny model.

Two runs of the shipped tiny YAML (its PSFT-only keys dropped), ``loss: ce`` (the session's
``ce_run``, shared with test_mlx_e2e.py) and ``loss: dft``:
same data, order, seed and initial adapters. The first report covers the first optimizer step,
trained from the same weights on the same micro-batches, so both runs log the same NLL there;
CE's objective is that NLL, DFT's is the token-mean of -p log p, below it and below 1/e.
"""

import math

import numpy as np
import pytest
from mlx_runs import reports, sft_yaml, train_cli
from safetensors.numpy import load_file


@pytest.mark.e2e
def test_loss_dft_trains_dft_through_the_mlx_cli(ce_run, tiny, tmp_path):
    ce_dir, _ = ce_run
    stdout = train_cli(tiny, tmp_path / "dft" / "adapters", config=sft_yaml(tmp_path / "dft", "dft"))
    ce, dft = reports(ce_dir, "train"), reports(tmp_path / "dft" / "adapters", "train")
    assert "dft · loss_agg token-mean" in stdout and "warning:" not in stdout
    assert [line.split()[:2] for line in stdout.splitlines() if line.startswith("note:")] == [["note:", "unlike"]]
    assert "weight_mean " in stdout  # the console line shows the objective's own metric by name
    assert [r["iteration"] for r in dft] == [r["iteration"] for r in ce] == [2, 4, 6, 8]
    assert dft[0]["psft/nll"] == pytest.approx(ce[0]["psft/nll"], rel=1e-6)  # same step, same weights
    assert ce[0]["train_loss"] == pytest.approx(ce[0]["psft/nll"], rel=1e-6)
    for report in dft:
        assert 0 < report["train_loss"] < min(report["psft/nll"], 1 / math.e)  # -p log p < -log p and <= 1/e
        assert not any(key in report for key in ("psft/clipfrac", "psft/ratio_mean"))  # no old policy
        assert 0 < report["psft/weight_mean"] < 1  # DFT's own metric reaches the MLX report too
    _assert_the_arrow_follows_nll(stdout, dft)
    a, b = (load_file(str(folder / "adapters.safetensors")) for folder in (ce_dir, tmp_path / "dft" / "adapters"))
    difference = max(np.abs(a[key] - b[key]).max() for key in a)
    print(
        f"mlx_train: DFT vs CE adapters after 4 steps: max |dw| = {difference:.3g}; first report: "
        f"DFT {dft[0]['train_loss']:.5f}, nll {dft[0]['psft/nll']:.5f}"
    )
    assert difference > 1e-3


def _assert_the_arrow_follows_nll(stdout: str, reports: list[dict]) -> None:
    """The console's trend arrow follows `nll`, which falls while DFT's objective rises (issue 18)."""
    rows = [line.split() for line in stdout.splitlines() if line[:7].strip().isdigit()]
    arrows = [row[3] for row in rows if len(row) > 3 and row[3] in ("▼", "▲")]
    nll = [r["psft/nll"] for r in reports]
    assert arrows == ["▼"] + ["▼" if b <= a else "▲" for a, b in zip(nll, nll[1:])]
    objective = [r["train_loss"] for r in reports]
    assert any((b <= a) != (d <= c) for a, b, c, d in zip(nll, nll[1:], objective, objective[1:]))  # they differ
