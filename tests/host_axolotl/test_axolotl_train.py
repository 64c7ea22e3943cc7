"""``loss: psft`` through the real ``axolotl train`` CLI on the tiny model (no mocks).

Twelve runs (two of them two processes) are started together by a session fixture, two at a
time, and shared between the tests: 6 optimizer steps of 2 x 2 ragged chat rows (micro-batch
2, gradient accumulation 2), sequential data order, lr 1e-2 so that the policy moves within a
window. Dropout is 0 throughout (the K = 1 identity needs it; see docs/axolotl.md).
"""

import json

import pytest
from axolotl_runs import config, train
from cli_runs import RunPool, runs_read_by_selected_tests
from safetensors.torch import load_file

STEPS, K = 6, 3
COMMON = dict(
    curriculum_sampling=True,
    max_steps=STEPS,
    learning_rate=1e-2,
    micro_batch_size=2,
    gradient_accumulation_steps=2,
    psft_refresh_steps=K,
    dataset_num_proc=1,
)
PSFT_ONLY_KEYS = ("psft_epsilon_low", "psft_epsilon_high", "psft_refresh_steps", "psft_warmup_steps")
PSFT_METRICS = {
    "psft/clipfrac",
    "psft/ratio_mean",
    "psft/ratio_min",
    "psft/ratio_max",
    "psft/approx_kl",
    "psft/entropy",
    "psft/nll",
    "psft/objective",
}
# Axolotl auto-enables its Triton LoRA kernels, which need CUDA: off on CPU.
CPU_LORA = dict(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False, lora_embedding_kernel=False)
# LoRA with packing, warm-up 1 and K = 2: windows [1, 3) and [3, 4); checkpoint-2 is inside the first.
LORA = dict(
    adapter="lora",
    lora_r=8,
    lora_alpha=16,
    lora_dropout=0.0,
    lora_target_linear=True,
    **CPU_LORA,
    sample_packing=True,
    psft_refresh_steps=2,
    psft_warmup_steps=1,
    max_steps=4,
    save_strategy="steps",
    save_steps=2,
)
# The test-only probe plugin (tests/cpu_site) records the LM head's calls: see the chunked-head test.
PROBED = dict(plugins=["psft_plugin.integrations.axolotl.PSFTPlugin", "psft_engine_probe.EngineProbePlugin"])
# On the 0.19 line only what changes there runs: the trainer hooks, resume, LoRA and packing. The
# chunked head and DDP go through the same Axolotl code on both lines (0.19 runs FSDP2 in test_engines).
DEFAULT_LINE_ONLY = pytest.mark.axolotl_line("0.21")


@pytest.fixture(scope="module")
def runs(request, tiny_assets, tmp_path_factory):
    """The CLI runs the selected tests read, submitted at once; tests wait for the ones they read."""
    model_dir, data_dir = tiny_assets
    root = tmp_path_factory.mktemp("axolotl")
    pool = RunPool(workers=2, wanted=runs_read_by_selected_tests(request))

    def job(name, processes=1, **overrides):
        cfg = config(model_dir, data_dir, root / name, **{**COMMON, **overrides})
        return lambda: train(root / name, cfg, processes=processes, name=name)

    checkpoint = root / "k3" / "out"
    pool.submit("k3", job("k3", save_strategy="steps", save_steps=1))
    pool.submit("ddp", job("ddp", processes=2, micro_batch_size=1))
    pool.submit("ce", job("ce", loss="ce", **{key: None for key in PSFT_ONLY_KEYS}, **PROBED))
    pool.submit("k1", job("k1", psft_refresh_steps=1))
    pool.submit("k1_chunked", job("k1_chunked", psft_refresh_steps=1, psft_lm_head_chunk_size=5, **PROBED))
    pool.submit("ddp_chunked", job("ddp_chunked", processes=2, micro_batch_size=1, psft_lm_head_chunk_size=3))
    adapter = (
        _head_adapter(model_dir, root / "head_adapter") if {"lora_head", "lora_head_chunked"} & pool.wanted else None
    )
    for name, chunk in (("lora_head", 0), ("lora_head_chunked", 4)):  # LoRA on lm_head, packing, checkpointing
        pool.submit(
            name,
            job(
                name,
                adapter="lora",
                lora_model_dir=str(adapter),
                lora_r=4,
                lora_alpha=8,
                lora_dropout=0.0,
                lora_target_modules=["q_proj", "v_proj", "lm_head"],
                **CPU_LORA,
                sample_packing=True,
                gradient_checkpointing=True,
                max_steps=4,
                psft_lm_head_chunk_size=chunk,
            ),
        )
    pool.submit("resume3", job("resume3", resume_from_checkpoint=str(checkpoint / "checkpoint-3")), after="k3")
    pool.submit("resume4", job("resume4", resume_from_checkpoint=str(checkpoint / "checkpoint-4")), after="k3")
    pool.submit("lora", job("lora", **LORA))
    lora_checkpoint = root / "lora" / "out" / "checkpoint-2"
    pool.submit("lora_resume2", job("lora_resume2", **LORA, resume_from_checkpoint=str(lora_checkpoint)), after="lora")
    yield pool
    pool.close()


def _head_adapter(model_dir, out):
    """A saved LoRA adapter on q/v_proj and lm_head with random (non-zero) A and B, so both runs
    start from the same adapter (Axolotl's own LoRA initialisation differs from run to run) and the
    head's adapter changes the log-probs from the first step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"]),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(out)
    return out


def _weights(run, name="model.safetensors"):
    return load_file(str(run.output_dir / name))


def _max_diff(a, b):
    return max((a[key] - b[key]).abs().max().item() for key in a)


def _fresh(step):
    return step["psft/ratio_min"] == step["psft/ratio_max"] == 1.0


@pytest.mark.e2e
@pytest.mark.runs("ce", "k1")
def test_k1_gives_the_same_weights_as_ce(runs):
    """With accumulation 2 and ragged rows, K = 1 PSFT and `loss: ce` (both global token-means)."""
    ce, k1 = runs.result("ce").check(), runs.result("k1").check()
    diff = _max_diff(_weights(k1), _weights(ce))
    print(f"K=1 vs CE through axolotl train: max |dw| = {diff:.3g}")
    assert diff <= 1e-6
    assert all("psft/nll" in step and "psft/clipfrac" not in step for step in ce.steps())
    assert all(_fresh(step) for step in k1.steps())


@pytest.mark.e2e
@pytest.mark.runs("ce", "k3")
def test_refresh_window_differs_from_sft_and_clips(runs):
    ce, k3 = runs.result("ce").check(), runs.result("k3").check()
    assert _max_diff(_weights(k3), _weights(ce)) > 1e-3
    steps = k3.steps()
    assert len(steps) == STEPS
    assert [i for i, step in enumerate(steps) if _fresh(step)] == [0, 3]  # a window starts at steps 0 and K
    assert max(step["psft/clipfrac"] for step in steps) > 0
    for step in steps:
        assert PSFT_METRICS <= step.keys() and {"tokens/trainable", "ppl"} <= step.keys()
        assert step["loss"] == pytest.approx(step["psft/objective"], abs=2e-3)  # both printed to 4 digits


@pytest.mark.e2e
@pytest.mark.runs("k3", "resume3")
def test_resume_at_a_window_boundary_reproduces_the_run(runs):
    k3, resumed = runs.result("k3").check(), runs.result("resume3").check()
    diff = _max_diff(_weights(resumed), _weights(k3))
    print(f"resume from checkpoint-3 (window boundary): max |dw| = {diff:.3g}")
    assert diff <= 1e-6
    assert len(resumed.steps()) == STEPS - 3


@pytest.mark.e2e
@pytest.mark.runs("k3", "resume4")
def test_resume_inside_a_window_reproduces_the_run(runs):
    """checkpoint-4 is inside the window [3, 6): steps 4 and 5 train against the old log-probs of
    step 3's weights, which the checkpoint carries (without them: 2.6e-2 and a warning)."""
    k3, resumed = runs.result("k3").check(), runs.result("resume4").check()
    diff = _max_diff(_weights(resumed), _weights(k3))
    print(f"resume from checkpoint-4 (inside the window [3, 6)): max |dw| = {diff:.3g}")
    assert diff <= 1e-6
    assert "its window cannot be restored" not in resumed.output
    steps = resumed.steps()
    assert len(steps) == 2 and not any(_fresh(step) for step in steps)  # no window starts at step 4
    for one, two in zip(k3.steps()[4:], steps, strict=True):
        assert two["psft/ratio_max"] == pytest.approx(one["psft/ratio_max"], rel=1e-3)


@pytest.mark.e2e
@pytest.mark.runs("lora", "lora_resume2")
def test_lora_resume_inside_a_window_reproduces_the_run(runs):
    """LoRA with sample packing: checkpoint-2 is inside the window [1, 3)."""
    lora, resumed = runs.result("lora").check(), runs.result("lora_resume2").check()
    a, b = _weights(lora, "adapter_model.safetensors"), _weights(resumed, "adapter_model.safetensors")
    diff = _max_diff(b, a)
    print(f"LoRA: resume from checkpoint-2 (inside the window [1, 3)): max |dw| = {diff:.3g}")
    assert diff <= 1e-6
    assert "its window cannot be restored" not in resumed.output and len(resumed.steps()) == 2


@pytest.mark.e2e
@pytest.mark.runs("lora")
def test_lora_with_sample_packing_and_warmup(runs):
    lora = runs.result("lora").check()
    adapter = _weights(lora, "adapter_model.safetensors")
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in adapter.items())  # B starts at 0
    steps = lora.steps()
    assert len(steps) == 4 and "psft/clipfrac" not in steps[0]  # step 0 is the SFT warm-up
    assert all(PSFT_METRICS <= step.keys() for step in steps[1:])
    assert [i for i, step in enumerate(steps) if i and _fresh(step)] == [1, 3]


@pytest.mark.e2e
@DEFAULT_LINE_ONLY
@pytest.mark.runs("k3", "ddp")
def test_two_process_data_parallel_equals_one_process(runs):
    """2 ranks x micro-batch 1 x accumulation 2 see the same 4 rows per step as 1 x 2 x 2."""
    single, ddp = runs.result("k3").check(), runs.result("ddp").check()
    diff = _max_diff(_weights(ddp), _weights(single))
    print(f"2-process gloo DDP vs 1 process: max |dw| = {diff:.3g}")
    assert diff <= 5e-5  # padding differs (1 vs 2 rows per micro-batch); Adam amplifies the ~1e-9 noise
    for one, two in zip(single.steps(), ddp.steps()):
        for key in ("loss", "psft/nll", "psft/clipfrac", "psft/ratio_max"):
            assert two[key] == pytest.approx(one[key], rel=2e-3, abs=2e-3), key


@pytest.mark.e2e
@DEFAULT_LINE_ONLY
@pytest.mark.runs("ce", "k1_chunked")
def test_k1_with_the_chunked_lm_head_gives_the_same_weights_as_ce(runs):
    """`psft_lm_head_chunk_size: 5`: the identity K = 1 == CE still holds through `axolotl train`,
    and no call of the LM head builds more than 5 rows of logits (after its one 8-position check of
    the model's logit transform), where CE's head builds every micro-batch's B x T rows."""
    ce, chunked = runs.result("ce").check(), runs.result("k1_chunked").check()
    diff = _max_diff(_weights(chunked), _weights(ce))
    print(f"K=1 with the chunked LM head vs CE through axolotl train: max |dw| = {diff:.3g}")
    assert diff <= 1e-5
    assert "log-probs: LM head in chunks of 5 tokens" in chunked.output and all(_fresh(s) for s in chunked.steps())
    full_rows, chunk_rows = _head_rows(ce), _head_rows(chunked)
    assert len(full_rows) == STEPS * COMMON["gradient_accumulation_steps"] and min(full_rows) > 5 * 2
    assert chunk_rows[0] == 8 and chunk_rows[1:] and max(chunk_rows[1:]) <= 5


def _head_rows(run) -> list[int]:
    """Rows of logits per LM-head call, as the probe plugin recorded them (one process)."""
    return json.loads((run.output_dir / "engine-rank0.json").read_text())["head_rows"]


@pytest.mark.e2e
@DEFAULT_LINE_ONLY
@pytest.mark.runs("ddp", "ddp_chunked")
def test_chunked_lm_head_under_two_process_data_parallel(runs):
    """Same run as `ddp` with the chunked head. Not bitwise: the head's weight gradient is summed
    chunk by chunk (~1e-8 apart, the K = 1 test above shows Adam growing that to ~7e-6), and with
    K = 3 the ratios then move clip decisions slightly; measured 6.4e-5."""
    full, chunked = runs.result("ddp").check(), runs.result("ddp_chunked").check()
    diff = _max_diff(_weights(chunked), _weights(full))
    print(f"2-process DDP, chunked LM head vs full logits: max |dw| = {diff:.3g}")
    assert diff <= 2e-4
    assert "log-probs: LM head in chunks of 3 tokens" in chunked.output
    for one, two in zip(full.steps(), chunked.steps(), strict=True):
        for key in ("loss", "psft/nll", "psft/clipfrac", "psft/entropy"):
            assert two[key] == pytest.approx(one[key], rel=2e-3, abs=2e-3), key


@pytest.mark.e2e
@DEFAULT_LINE_ONLY
@pytest.mark.runs("lora_head", "lora_head_chunked")
def test_chunked_lm_head_with_lora_on_the_head_packing_and_checkpointing(runs):
    """LoRA on lm_head goes through the chunks (its adapter trains the same as with full logits)."""
    full, chunked = runs.result("lora_head").check(), runs.result("lora_head_chunked").check()
    a, b = _weights(full, "adapter_model.safetensors"), _weights(chunked, "adapter_model.safetensors")
    start = load_file(str(full.directory.parent / "head_adapter" / "adapter_model.safetensors"))
    head = [key for key in b if "lm_head" in key and "lora_" in key]
    assert head and all((b[key] - start[key]).abs().max() > 1e-4 for key in head)  # the head's adapter trained
    diff = _max_diff(b, a)
    print(f"LoRA on lm_head + packing + gradient checkpointing, chunked vs full: max |dw| = {diff:.3g}")
    assert diff <= 1e-5
