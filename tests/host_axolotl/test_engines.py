"""PSFT under the sharded engines, through the real ``axolotl train`` on 2 CPU processes (gloo).

For each of FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (the shipped ``configs/axolotl/deepspeed/*.json``):

- ``psft_refresh_steps: 1`` trains the same weights as ``loss: ce`` (both sharded). Under FSDP2
  and ZeRO-3, which shard the LM head's weight, that K = 1 run also sets ``psft_lm_head_chunk_size``:
  the head is called chunk by chunk inside the wrapped forward, where the engine gathers its
  weight, also when the backward recomputes a chunk (full logits under an engine are covered by
  the CE run and the K = 2 run);
- PSFT with K = 2 on 2 processes (micro-batch 1) matches 1 plain process (micro-batch 2) on the
  same global batch of 4 rows per step, and so do its ratio statistics;
- a resume from the checkpoint inside the window [2, 4) (step 3) reproduces the uninterrupted run:
  each rank restores its own share of the window's old log-probs from the checkpoint and stamps
  nothing (FSDP2 and ZeRO-3: ZeRO-2 saves and loads its checkpoint through the same DeepSpeed engine calls
  as ZeRO-3);
- the engine really ran: the test-only probe plugin (``tests/cpu_site/psft_engine_probe.py``)
  records on every rank the accelerator's engine and a ``q_proj`` weight's layout, after each
  step and when PSFT's old-policy pass starts. A silent fallback to DDP fails these checks.

On CPU, accelerate would otherwise replace both engines with DDP: the runs set
``PSFT_TEST_CPU_ENGINE=1``, which turns on the test-only patches in ``tests/cpu_site``. The 0.19
line runs FSDP2 only (its one engine: 0.19 builds the device mesh differently); the DeepSpeed
engines go through the same Axolotl code on both lines.
"""

from __future__ import annotations

import json

import pytest
from axolotl_runs import ROOT, config, train
from cli_runs import RunPool, runs_read_by_selected_tests
from safetensors.torch import load_file

PLUGINS = ["psft_plugin.integrations.axolotl.PSFTPlugin", "psft_engine_probe.EngineProbePlugin"]
STEPS, K = 4, 2
RESUME_AT = 3  # inside the window [2, 4): its old log-probs come from the weights of step 2
COMMON = dict(
    curriculum_sampling=True,
    max_steps=STEPS,
    learning_rate=1e-2,
    micro_batch_size=1,
    gradient_accumulation_steps=2,
    psft_refresh_steps=K,
    dataset_num_proc=1,
    plugins=PLUGINS,
)
FSDP2 = dict(
    fsdp_version=2,
    fsdp_config=dict(
        offload_params=False,
        state_dict_type="FULL_STATE_DICT",
        auto_wrap_policy="TRANSFORMER_BASED_WRAP",
        transformer_layer_cls_to_wrap="LlamaDecoderLayer",
        reshard_after_forward=True,
    ),
)
DEEPSPEED = ROOT / "configs" / "axolotl" / "deepspeed"
ENGINES = {
    "fsdp2": FSDP2,
    "zero2": dict(deepspeed=str(DEEPSPEED / "zero2.json")),
    "zero3": dict(deepspeed=str(DEEPSPEED / "zero3.json")),
}
ENGINE_ENV = {"PSFT_TEST_CPU_ENGINE": "1", "DS_ACCELERATOR": "cpu"}
# The engines that shard the LM head's weight, between the forward and the chunks' recomputation.
CHUNKED_ENGINES, CHUNK = ("fsdp2", "zero3"), 16
RESUMED_ENGINES = ("fsdp2", "zero3")
DEFAULT_LINE_ONLY = pytest.mark.axolotl_line("0.21")


def on_lines(engines):
    """``engines`` as test parameters: FSDP2 on every line, the DeepSpeed stages on the default line."""
    return [pytest.param(engine, marks=() if engine == "fsdp2" else DEFAULT_LINE_ONLY) for engine in engines]


PSFT_ONLY_KEYS = ("psft_epsilon_low", "psft_epsilon_high", "psft_refresh_steps", "psft_warmup_steps")


@pytest.fixture(scope="module")
def runs(request, tiny_assets, tmp_path_factory):
    """The runs the selected tests read, two at a time: one plain process, then 3 or 4 per engine."""
    model_dir, data_dir = tiny_assets
    root = tmp_path_factory.mktemp("engines")
    pool = RunPool(workers=2, wanted=runs_read_by_selected_tests(request))

    def job(name, processes=2, **overrides):
        cfg = config(model_dir, data_dir, root / name, **{**COMMON, **overrides})
        env = ENGINE_ENV if processes > 1 else None
        return lambda: train(root / name, cfg, processes=processes, name=name, env=env)

    pool.submit("single", job("single", processes=1, micro_batch_size=2))
    for engine, settings in ENGINES.items():
        pool.submit(f"{engine}-ce", job(f"{engine}-ce", loss="ce", **{k: None for k in PSFT_ONLY_KEYS}, **settings))
        chunk = CHUNK if engine in CHUNKED_ENGINES else 0
        pool.submit(
            f"{engine}-k1", job(f"{engine}-k1", **{**settings, "psft_refresh_steps": 1}, psft_lm_head_chunk_size=chunk)
        )
        pool.submit(f"{engine}-k2", job(f"{engine}-k2", save_strategy="steps", save_steps=RESUME_AT, **settings))
        checkpoint = root / f"{engine}-k2" / "out" / f"checkpoint-{RESUME_AT}"
        pool.submit(
            f"{engine}-resume",
            job(f"{engine}-resume", resume_from_checkpoint=str(checkpoint), **settings),
            after=f"{engine}-k2",
        )
    yield pool
    pool.close()


def _weights(run) -> dict:
    return load_file(str(run.output_dir / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), "the saved models differ in layout"
    return max((a[key] - b[key]).abs().max().item() for key in a)


def _probes(run) -> list[dict]:
    """Both ranks' engine records."""
    return [json.loads((run.output_dir / f"engine-rank{rank}.json").read_text()) for rank in (0, 1)]


def _sharded(engine: str, layout: dict) -> bool:
    """``layout`` (the probe's record of one weight) is a shard on this rank, as ``engine`` holds it.

    A shard, not exactly half: the tiny head's row count is odd, so the ranks' shards differ by a row.
    """
    if engine == "fsdp2":
        return layout["kind"] == "DTensor" and 0 < layout["local_numel"] < layout["global_numel"]
    return layout["local_numel"] == 0 and 0 < layout["partition_numel"] < layout["global_numel"]


def _assert_engine_ran(engine: str, run, stamped: bool) -> None:
    """The accelerator ran ``engine`` on both ranks and held the probed weight as that engine would."""
    for record in _probes(run):
        layouts = record["at_step"] + record["at_stamp"]
        assert len(record["at_step"]) == STEPS - int("resume" in run.name) * RESUME_AT
        assert bool(record["at_stamp"]) == stamped
        if engine == "fsdp2":
            assert record["distributed_type"] == "DistributedType.FSDP" and record["fsdp2"]
            assert all(lay["kind"] == "DTensor" and lay["local_numel"] * 2 == lay["global_numel"] for lay in layouts)
        else:
            assert record["distributed_type"] == "DistributedType.DEEPSPEED"
            assert record["zero_stage"] == int(engine[-1]) and record["model_class"] == "DeepSpeedEngine"
            if engine == "zero3":  # outside a forward a ZeRO-3 parameter is empty; each rank holds half
                assert all(
                    lay["local_numel"] == 0 and lay["partition_numel"] * 2 == lay["global_numel"] for lay in layouts
                )
            else:  # ZeRO-2 partitions optimizer state and gradients, never the weights
                assert all(lay["local_numel"] == lay["global_numel"] for lay in layouts)


@pytest.mark.e2e
@pytest.mark.parametrize("engine", on_lines(ENGINES))
@pytest.mark.runs("{engine}-ce", "{engine}-k1")
def test_k1_equals_ce_under_the_engine(runs, engine):
    """Bitwise with full logits (ZeRO-2); with the LM head in chunks (FSDP2, ZeRO-3) the head's weight
    gradient is summed chunk by chunk (~1e-8 apart), which Adam grows to ~1e-6."""
    ce, k1 = runs.result(f"{engine}-ce").check(), runs.result(f"{engine}-k1").check()
    _assert_engine_ran(engine, ce, stamped=False)
    _assert_engine_ran(engine, k1, stamped=False)  # K = 1: every step's old policy is its own forward
    chunked = engine in CHUNKED_ENGINES
    assert (f"log-probs: LM head in chunks of {CHUNK} tokens" in k1.output) == chunked
    if chunked:  # the chunks ran on a sharded head, gathered inside the wrapped forward
        assert all(_sharded(engine, record["head"]) for record in _probes(k1))
        assert "returned a view tensor" not in k1.output
    diff = _max_diff(_weights(k1), _weights(ce))
    print(f"{engine}: K=1 vs CE through axolotl train, 2 processes, chunked head {chunked}: max |dw| = {diff:.3g}")
    assert diff <= (1e-5 if chunked else 1e-6)


@pytest.mark.e2e
@pytest.mark.parametrize("engine", on_lines(ENGINES))
@pytest.mark.runs("single", "{engine}-k2")
def test_two_sharded_processes_equal_one_process(runs, engine):
    single, sharded = runs.result("single").check(), runs.result(f"{engine}-k2").check()
    _assert_engine_ran(engine, sharded, stamped=True)
    diff = _max_diff(_weights(sharded), _weights(single))
    print(f"{engine}: PSFT K=2, 2 processes vs 1 process: max |dw| = {diff:.3g}")
    assert diff <= 2e-5
    one, two = single.steps(), sharded.steps()
    assert len(one) == len(two) == STEPS
    assert max(step["psft/clipfrac"] for step in two) > 0  # the window really clipped
    for a, b in zip(one, two):
        for key in ("loss", "psft/nll", "psft/clipfrac", "psft/ratio_min", "psft/ratio_max"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-3), key


@pytest.mark.e2e
@pytest.mark.parametrize("engine", on_lines(RESUMED_ENGINES))
@pytest.mark.runs("{engine}-k2", "{engine}-resume")
def test_resume_inside_a_window_under_the_engine(runs, engine):
    """The resumed run stamps nothing (the probe sees no old-policy pass): every rank trains step 3
    against the old log-probs it saved with the checkpoint, stamped with the weights of step 2."""
    full, resumed = runs.result(f"{engine}-k2").check(), runs.result(f"{engine}-resume").check()
    _assert_engine_ran(engine, resumed, stamped=False)
    assert "its window cannot be restored" not in resumed.output
    diff = _max_diff(_weights(resumed), _weights(full))
    print(f"{engine}: resume from checkpoint-{RESUME_AT} (inside a window) vs uninterrupted: max |dw| = {diff:.3g}")
    assert diff <= 1e-6
    assert len(resumed.steps()) == STEPS - RESUME_AT
