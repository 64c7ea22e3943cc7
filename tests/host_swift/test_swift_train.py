"""``psft-swift sft`` through ms-swift's real ``swift sft`` entry on the tiny model (issue 21's "done means").

Twelve runs, two at a time, shared by the tests (full fine-tuning unless named ``lora``, GA 2):

- ``ce_full``: plain ``swift sft`` (ms-swift's default loss); ``psft1_full``: ``--loss_type psft
  --psft_refresh_steps 1``; both evaluate every 2 steps;
- ``ce_lora``: ``psft-swift sft`` without any of our flags (handed to ``swift sft`` unchanged);
  ``psft1_lora``: PSFT K = 1 with LoRA;
- ``dft_swift``: ``swift sft --enable_dft_loss true``; ``dft``: ``python -m
  psft_plugin.integrations.swift sft --loss_type dft --psft_lm_head_chunk_size 16`` (the LM head
  in chunks of response tokens);
- ``k4``: a YAML config file carrying ``loss_type: psft`` and ``psft_refresh_steps: 4``;
  ``k4_ddp``: the same flags with ``NPROC_PER_NODE=2`` and half the per-device batch;
- ``zero2_ce``, ``zero2_psft1``, ``zero3_ce``, ``zero3_psft1``: ms-swift's default loss and PSFT
  K = 1 under ``--deepspeed zero2`` / ``zero3`` on two ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import RunPool, assert_zero3_sharded, max_diff
from swift_runs import run, tiny_flags

pytestmark = [pytest.mark.e2e, pytest.mark.requires("ms-swift")]
TOLERANCE = 1e-5
PSFT_K1 = ["--loss_type", "psft", "--psft_refresh_steps", "1"]
# Two gloo ranks under DeepSpeed: the test-only patches of tests/cpu_site keep accelerate from
# swapping the engine for DDP on a CPU, and start DeepSpeed's process group before ms-swift loads a
# ZeRO-3 model, as a GPU run does (see its sitecustomize).
ZERO_ENV = {
    "NPROC_PER_NODE": "2",
    "ACCELERATE_USE_CPU": "true",
    "PSFT_TEST_CPU_ENGINE": "1",
    "DS_ACCELERATOR": "cpu",
    "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "cpu_site"),
}


def k4_config(path, model_dir, data_dir, out, **overrides) -> str:
    """A ``swift sft`` YAML config with the tiny flags and PSFT K = 4 (values as YAML scalars)."""
    flags = tiny_flags(model_dir, data_dir, out, **overrides)
    config = {key[2:]: yaml.safe_load(value) for key, value in zip(flags[::2], flags[1::2])}
    path.write_text(yaml.safe_dump({**config, "loss_type": "psft", "psft_refresh_steps": 4}))
    return str(path)


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    model_dir, data_dir = tiny_assets
    root = tmp_path_factory.mktemp("swift")
    pool = RunPool()

    def submit(name, command, env=None, **overrides):
        out = root / name / "out"
        pool.submit(name, lambda: run(name, [*command, *tiny_flags(model_dir, data_dir, out, **overrides)], out, env))

    ddp_out = root / "k4_ddp" / "out"
    evaluate = ["--val_dataset", str(data_dir / "valid.jsonl"), "--eval_strategy", "steps", "--eval_steps", "2"]
    submit("ce_full", ["swift", "sft", *evaluate])
    submit("psft1_full", ["psft-swift", "sft", *PSFT_K1, *evaluate])
    submit("ce_lora", ["psft-swift", "sft"], tuner_type="lora")
    submit("psft1_lora", ["psft-swift", "sft", *PSFT_K1], tuner_type="lora")
    submit("dft_swift", ["swift", "sft", "--enable_dft_loss", "true"])
    dft = ["-m", "psft_plugin.integrations.swift", "sft", "--loss_type", "dft", "--psft_lm_head_chunk_size", "16"]
    submit("dft", [sys.executable, *dft])
    (root / "k4").mkdir()
    config = k4_config(root / "k4" / "cfg.yaml", model_dir, data_dir, root / "k4" / "out")
    pool.submit("k4", lambda: run("k4", ["psft-swift", "sft", config], root / "k4" / "out"))
    ddp_config = k4_config(root / "ddp.yaml", model_dir, data_dir, ddp_out, per_device_train_batch_size=1)
    pool.submit(
        "k4_ddp",
        lambda: run(
            "k4_ddp", ["psft-swift", "sft", ddp_config], ddp_out, {"NPROC_PER_NODE": "2", "MASTER_PORT": "29561"}
        ),
    )
    # ms-swift turns fp16 on under DeepSpeed unless told otherwise: float32 like the other runs.
    zero = dict(fp16="false", bf16="false", per_device_train_batch_size=1, save_only_model="false")
    for stage, port in ((2, 29562), (3, 29564)):
        ce_env, psft_env = ({**ZERO_ENV, "MASTER_PORT": str(port + offset)} for offset in (0, 1))
        submit(f"zero{stage}_ce", ["swift", "sft"], ce_env, deepspeed=f"zero{stage}", **zero)
        submit(f"zero{stage}_psft1", ["psft-swift", "sft", *PSFT_K1], psft_env, deepspeed=f"zero{stage}", **zero)
    yield pool
    pool.close()


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_psft_with_one_step_windows_trains_the_default_loss_weights(runs, tuner):
    psft, ce = runs.result(f"psft1_{tuner}").check(), runs.result(f"ce_{tuner}").check()
    assert max_diff(psft.weights(), ce.weights()) <= TOLERANCE
    assert len(psft.logs()) == 4 and all("psft/objective" in line for line in psft.logs())


def test_evaluation_reports_plain_nll(runs):
    psft, ce = runs.result("psft1_full").check(), runs.result("ce_full").check()
    assert len(psft.eval_losses()) == 2
    assert psft.eval_losses() == pytest.approx(ce.eval_losses(), abs=TOLERANCE)
    assert all(line["loss"] < 0 for line in psft.logs())  # training logs the PSFT objective, not the NLL


def test_dft_equals_ms_swift_dft_and_differs_from_cross_entropy(runs):
    ours, theirs, ce = (runs.result(name).check() for name in ("dft", "dft_swift", "ce_full"))
    assert max_diff(ours.weights(), theirs.weights()) <= TOLERANCE
    assert max_diff(ours.weights(), ce.weights()) > 100 * TOLERANCE  # the comparison can fail


def test_a_config_file_carries_the_keys_and_windows_clip(runs):
    k4, k1 = runs.result("k4").check(), runs.result("psft1_full").check()
    logs = k4.logs()
    assert len(logs) == 4 and max(line["psft/clipfrac"] for line in logs) > 0
    assert all(line["psft/clipfrac"] == 0 for line in k1.logs())
    assert "psft/clipfrac" in k4.output  # ms-swift's console line
    assert max_diff(k4.weights(), k1.weights()) > 100 * TOLERANCE


def test_two_data_parallel_ranks_train_one_process_weights(runs):
    ddp, single = runs.result("k4_ddp").check(), runs.result("k4").check()
    assert json.loads((ddp.out / "args.json").read_text())["global_world_size"] == 2
    assert max_diff(ddp.weights(), single.weights()) <= TOLERANCE
    assert [line["psft/clipfrac"] for line in ddp.logs()] == pytest.approx(
        [line["psft/clipfrac"] for line in single.logs()], abs=1e-6
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_psft_with_one_step_windows_trains_the_default_loss_weights(runs, stage):
    """Measured 5.4e-7 under ZeRO-3; K = 4 instead of K = 1 lands 0.92 away (SGD, lr 0.5)."""
    psft, ce = runs.result(f"zero{stage}_psft1").check(), runs.result(f"zero{stage}_ce").check()
    for done in (psft, ce):  # the engine ran: each rank saved its ZeRO optimizer partition
        partitions = {path.name for path in done.out.glob("checkpoint-*/global_step*/zero_pp_rank_*_optim_states.pt")}
        assert partitions == {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)}, partitions
        if stage == 3:  # and held the weights in shards
            (step_dir,) = done.out.glob("checkpoint-*/global_step*")  # the last step's, the only one
            assert_zero3_sharded(step_dir, done.weights())
    assert max_diff(psft.weights(), ce.weights()) <= TOLERANCE
    assert all(line["loss"] < 0 for line in psft.logs()) and all(line["loss"] > 0 for line in ce.logs())
