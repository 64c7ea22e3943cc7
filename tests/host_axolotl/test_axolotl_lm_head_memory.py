"""`psft_lm_head_chunk_size` through the real `axolotl train`: no [B, T, V] logits, by peak memory.

The tiny model's body with a 131,072-entry head (the tokenizer uses the first ~400 ids; the rest
only make the head large): one micro-batch of 2 x 256 positions has 256 MiB of float32 logits.
The full-logits path holds them plus their gradient at the backward's peak; the chunked path
(64 tokens per chunk) holds ~3 chunks of 64 x V. So the peak resident set of the training
process must drop by at least one micro-batch's float32 logits (measured: see the test's print).
"""

import shutil

import pytest
import torch
from axolotl_runs import RunPool, config, train

VOCAB, MICRO_BATCH, SEQ_LEN, CHUNK = 131072, 2, 256, 64
LOGITS_BYTES = MICRO_BATCH * SEQ_LEN * VOCAB * 4


@pytest.fixture(scope="module")
def big_vocab_model(tiny_assets, tmp_path_factory):
    """The tiny Llama's config with ``VOCAB`` entries, random weights, the tiny tokenizer."""
    from transformers import AutoConfig, LlamaForCausalLM

    model_dir, _ = tiny_assets
    out = tmp_path_factory.mktemp("big_vocab")
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.vocab_size = VOCAB
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for path in model_dir.iterdir():
        if "token" in path.name or path.name == "chat_template.jinja":
            shutil.copy(path, out / path.name)
    return out


@pytest.fixture(scope="module")
def memory_runs(big_vocab_model, tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_head_memory")
    pool = RunPool(workers=2)
    for name, chunk in (("full", 0), ("chunked", CHUNK)):
        cfg = config(
            big_vocab_model,
            tiny_assets[1],
            root / name,
            max_steps=2,
            micro_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=1,
            sequence_len=SEQ_LEN,
            pad_to_sequence_len=True,
            psft_refresh_steps=2,
            psft_lm_head_chunk_size=chunk,
            dataset_num_proc=1,
        )
        pool.submit(name, lambda name=name, cfg=cfg: train(root / name, cfg, name=f"memory-{name}", peak_memory=True))
    yield pool
    pool.close()


@pytest.mark.e2e
def test_chunked_lm_head_builds_no_full_logits_in_axolotl_train(memory_runs):
    full, chunked = memory_runs.result("full").check(), memory_runs.result("chunked").check()
    for run in (full, chunked):
        steps = run.steps()
        assert len(steps) == 2 and all("psft/nll" in step for step in steps)
    saved = full.peak_rss_bytes - chunked.peak_rss_bytes
    print(
        f"peak RSS: full logits {full.peak_rss_bytes / 2**20:.0f} MiB, chunked {chunked.peak_rss_bytes / 2**20:.0f} "
        f"MiB, saved {saved / 2**20:.0f} MiB = {saved / LOGITS_BYTES:.2f} x one micro-batch's fp32 logits "
        f"({LOGITS_BYTES / 2**20:.0f} MiB)"
    )
    assert "log-probs: LM head in chunks of 64 tokens" in chunked.output
    assert saved >= LOGITS_BYTES
    # Same loss either way (the weights are compared in test_axolotl_train.py).
    for one, two in zip(full.steps(), chunked.steps()):
        assert two["psft/nll"] == pytest.approx(one["psft/nll"], rel=1e-4)
