"""``loss: dft`` through the real ``python -m psft_plugin.mlx_train`` on the tiny model.

Two runs of the shipped tiny YAML (its PSFT-only keys dropped), ``loss: ce`` and ``loss: dft``:
same data, order, seed and initial adapters. The first report covers the first optimizer step,
trained from the same weights on the same micro-batches, so both runs log the same NLL there;
CE's objective is that NLL, DFT's is the token-mean of -p log p, below it and below 1/e.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs/mlx/tiny.yaml"
PSFT_ONLY_KEYS = ("psft_epsilon_low", "psft_epsilon_high", "psft_refresh_steps", "psft_warmup_steps")


def _train(run_cli, tiny, out: Path, loss: str) -> tuple[str, list[dict]]:
    cfg = {key: value for key, value in yaml.safe_load(TINY_YAML.read_text()).items() if key not in PSFT_ONLY_KEYS}
    cfg.update(
        model=str(tiny[0]),
        data=str(tiny[1]),
        adapter_path=str(out / "adapters"),
        loss=loss,
        iters=8,
        learning_rate=5e-2,
        steps_per_eval=100,
        save_every=100,
    )
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = run_cli("--config", str(out / "config.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = map(json.loads, (out / "adapters" / "metrics.jsonl").read_text().splitlines())
    return result.stdout, [row for row in rows if row["kind"] == "train"]


@pytest.mark.e2e
def test_loss_dft_trains_dft_through_the_mlx_cli(run_cli, tiny, tmp_path):
    _, ce = _train(run_cli, tiny, tmp_path / "ce", "ce")
    stdout, dft = _train(run_cli, tiny, tmp_path / "dft", "dft")
    assert "dft · loss_agg token-mean" in stdout and "note:" not in stdout
    assert "weight_mean " in stdout  # the console line shows the objective's own metric by name
    assert [r["iteration"] for r in dft] == [r["iteration"] for r in ce] == [2, 4, 6, 8]
    assert dft[0]["psft/nll"] == pytest.approx(ce[0]["psft/nll"], rel=1e-6)  # same step, same weights
    assert ce[0]["train_loss"] == pytest.approx(ce[0]["psft/nll"], rel=1e-6)
    for report in dft:
        assert 0 < report["train_loss"] < min(report["psft/nll"], 1 / math.e)  # -p log p < -log p and <= 1/e
        assert not any(key in report for key in ("psft/clipfrac", "psft/ratio_mean"))  # no old policy
        assert 0 < report["psft/weight_mean"] < 1  # DFT's own metric reaches the MLX report too
    a, b = (load_file(str(tmp_path / loss / "adapters" / "adapters.safetensors")) for loss in ("ce", "dft"))
    difference = max(np.abs(a[key] - b[key]).max() for key in a)
    print(
        f"mlx_train: DFT vs CE adapters after 4 steps: max |dw| = {difference:.3g}; first report: "
        f"DFT {dft[0]['train_loss']:.5f}, nll {dft[0]['psft/nll']:.5f}"
    )
    assert difference > 1e-3
