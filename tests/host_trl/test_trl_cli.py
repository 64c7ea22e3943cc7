"""``psft-trl --config cfg.yaml`` as a real subprocess: full and LoRA, data parallel and FSDP2.

The runs of this module, two at a time (``python -m psft_plugin.integrations.trl`` is the
``psft-trl`` script's ``main``; TRL's own ``trl sft`` is the oracle):

- full fine-tuning, ``loss: psft``, ``psft_refresh_steps: 1`` trains the weights of ``trl sft``
  (``loss_type: nll``) on the same YAML;
- LoRA (``use_peft: true``), K = 2, saves the adapter and logs the ``psft/*`` ratio statistics
  and TRL's metrics; on 2 processes started by ``accelerate launch`` (DDP, micro-batch 1) it trains
  the adapter of 1 process (micro-batch 2);
- FSDP2 on 2 processes started by ``torchrun``: K = 1 trains the weights of ``loss: ce``;
- the engine really ran: ``trl_probe`` (the CLI plus a test-only recorder) writes each rank's
  accelerator engine and a ``q_proj`` weight's layout after each step and at each old-policy pass;
  a silent fallback to DDP (accelerate's default on CPU) fails these checks;
- a misspelt ``psft_*`` key stops the CLI with the key and the fix, exit status 2, no traceback.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from cli_runs import max_diff
from safetensors.torch import load_file
from trl_runs import PROBED_TRL, PSFT_TRL, TRL_SFT, cli, cli_config

K = 2
LORA = dict(use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])

FSDP2 = dict(
    fsdp="full_shard auto_wrap",
    fsdp_config=dict(
        fsdp_version=2,
        transformer_layer_cls_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",  # one model.safetensors (read by transformers 5.20)
    ),
    env={"FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"},  # the same for transformers 5.6 (TRL 0.24), through accelerate
)
ENGINE_ENV = {"PSFT_TEST_CPU_ENGINE": "1"}
TWO_RANKS = dict(per_device_train_batch_size=1)  # 2 ranks x 1 row = the single process's 2 rows per micro-batch


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """``{name: Future[Run]}`` of every run of the module, two at a time."""
    model_dir, data_dir = tiny_assets
    root = tmp_path_factory.mktemp("trl-cli")
    jobs = {
        "trl-sft": (TRL_SFT, 1, dict(loss_type="nll")),
        "full-k1": (PSFT_TRL, 1, dict(loss="psft", psft_refresh_steps=1)),
        "lora-k2": (PSFT_TRL, 1, dict(loss="psft", psft_refresh_steps=K, **LORA)),
        "lora-k2-ddp": (PROBED_TRL, 2, dict(loss="psft", psft_refresh_steps=K, **LORA, **TWO_RANKS), "accelerate"),
        "fsdp-ce": (PROBED_TRL, 2, dict(loss="ce", **FSDP2, **TWO_RANKS)),
        "fsdp-k1": (PROBED_TRL, 2, dict(loss="psft", psft_refresh_steps=1, **FSDP2, **TWO_RANKS)),
        "misspelt": (PSFT_TRL, 1, dict(loss="psft", psft_refresh_step=K)),
    }
    executor = ThreadPoolExecutor(max_workers=2)

    def job(name, command, processes, settings, launcher="torchrun"):
        cfg = cli_config(model_dir, data_dir, root / name, **settings)
        return cli(root / name, cfg, command, processes, env=ENGINE_ENV if processes > 1 else None, launcher=launcher)

    futures = {name: executor.submit(job, name, *spec) for name, spec in jobs.items()}
    yield futures
    executor.shutdown(wait=True, cancel_futures=True)


def _run(runs, name):
    return runs[name].result().check()


def _weights(run, adapter: bool = False) -> dict:
    return load_file(str(run.output_dir / ("adapter_model.safetensors" if adapter else "model.safetensors")))


def _assert_engine_ran(run, engine: str, stamped: bool) -> None:
    for rank in (0, 1):
        record = json.loads((run.output_dir / f"engine-rank{rank}.json").read_text())
        layouts = record["at_step"] + record["at_stamp"]
        assert len(record["at_step"]) == 4 and bool(record["at_stamp"]) == stamped
        if engine == "fsdp2":
            assert record["distributed_type"] == "DistributedType.FSDP" and record["fsdp2"]
            assert all(lay["kind"] == "DTensor" and 2 * lay["local_numel"] == lay["global_numel"] for lay in layouts)
        else:
            assert record["distributed_type"] == "DistributedType.MULTI_CPU" and not record["fsdp2"]
            assert all(lay["local_numel"] == lay["global_numel"] for lay in layouts)


@pytest.mark.e2e
def test_full_k1_through_the_cli_trains_the_weights_of_trl_sft(runs):
    reference, ours = _run(runs, "trl-sft"), _run(runs, "full-k1")
    diff = max_diff(_weights(ours), _weights(reference))
    print(f"psft-trl full, K=1 vs trl sft (loss_type nll): max |dw| = {diff:.3g}")
    assert diff <= 1e-5
    assert "psft-trl: loss=psft" in ours.output and all("psft/clipfrac" in step for step in ours.steps())


@pytest.mark.e2e
def test_lora_through_the_cli_saves_the_adapter_and_logs_both_metric_sets(runs):
    run = _run(runs, "lora-k2")
    steps = run.steps()
    assert (run.output_dir / "adapter_config.json").exists() and not (run.output_dir / "model.safetensors").exists()
    assert len(steps) == 4 and all("psft/clipfrac" in step and "psft/ratio_max" in step for step in steps)
    assert steps[1]["psft/ratio_max"] != 1.0  # step 2 is scored against the window's old policy
    assert all(key in step for step in steps for key in ("entropy", "mean_token_accuracy", "num_tokens", "psft/nll"))


@pytest.mark.e2e
def test_two_processes_train_the_adapter_of_one(runs):
    single, ddp = _run(runs, "lora-k2"), _run(runs, "lora-k2-ddp")
    _assert_engine_ran(ddp, "ddp", stamped=True)
    one, two = _weights(single, adapter=True), _weights(ddp, adapter=True)
    assert one.keys() == two.keys()
    diff = max(((two[k] - one[k]).abs().max() / one[k].abs().max()).item() for k in one)
    print(f"psft-trl LoRA, PSFT K={K}: 2 processes (DDP) vs 1 process: max |dw| / max |w| = {diff:.3g}")
    # Measured 2e-7 in float32 (trl 1.14.1 and 0.24.0); 1.5e-3 under TRL's default bfloat16 autocast,
    # which trl_runs.COMMON turns off.
    assert diff <= 1e-5
    for a, b in zip(single.steps(), ddp.steps()):
        for key in ("loss", "psft/nll", "psft/clipfrac", "psft/ratio_max"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-3), key


@pytest.mark.e2e
def test_fsdp2_k1_trains_the_weights_of_ce(runs):
    ce, k1 = _run(runs, "fsdp-ce"), _run(runs, "fsdp-k1")
    _assert_engine_ran(ce, "fsdp2", stamped=False)
    _assert_engine_ran(k1, "fsdp2", stamped=False)  # K = 1: every step's old policy is its own forward
    diff = max_diff(_weights(k1), _weights(ce))
    print(f"psft-trl FSDP2, 2 processes: K=1 vs loss: ce: max |dw| = {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.e2e
def test_a_misspelt_key_stops_the_cli_with_the_fix(runs):
    run = runs["misspelt"].result()
    assert run.returncode == 2 and "Traceback" not in run.output, run.output[-3000:]
    assert "unknown key `psft_refresh_step` (did you mean `psft_refresh_steps`?)" in run.output
    assert not run.output_dir.exists()
