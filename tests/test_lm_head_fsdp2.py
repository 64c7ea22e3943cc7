"""The chunked LM head (`psft_lm_head_chunk_size`) under FSDP2, on 2 CPU processes, without Axolotl."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "torch_workers" / "fsdp2_chunked_head.py"


@pytest.mark.e2e
def test_chunked_head_under_fsdp2_trains_as_full_logits(tmp_path):
    """The root (LM head included) re-shards after the forward; the chunks' recomputation in the
    backward must still see the gathered head, and the weights must end as full logits' do."""
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(WORKER),
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "returned a view tensor" not in result.stderr
    measured = json.loads(report.read_text())
    print(f"FSDP2, LM head in chunks vs unsharded full logits: max |dw| = {measured['max_weight_diff']:.3g}")
    assert measured["head_is_dtensor"] and measured["head_local_numel"] * 2 == measured["head_numel"]
    assert measured["reference_moved"] > 1e-2  # the steps really trained
    assert measured["max_weight_diff"] <= 1e-5
