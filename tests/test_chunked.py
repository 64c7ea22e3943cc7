"""The chunked log-prob path equals the direct one, values and gradients, in both backends."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import psft_mlx.chunked
import psft_torch.chunked
from psft_mlx import token_logprobs as mlx_logprobs
from psft_torch import token_logprobs as torch_logprobs


def _data(seed=0, b=2, t=7, h=16, v=50):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, v, size=(b, t))
    targets[0, :3] = -100
    return (
        rng.normal(size=(b, t, h)).astype(np.float32),
        rng.normal(size=(v, h)).astype(np.float32) * 0.3,
        targets,
        rng.normal(size=(v,)).astype(np.float32),
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_torch_chunked_matches_direct(chunk_size):
    hidden, weight, targets, bias = (torch.tensor(a) for a in _data())
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    direct = torch_logprobs(h1 @ w1.T + bias, targets)
    chunked = psft_torch.chunked.chunked_token_logprobs(h2, w2, targets, bias=bias, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, direct, rtol=0, atol=1e-5)
    direct.sum().backward()
    chunked.sum().backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=0, atol=1e-5)


def test_torch_chunked_saves_no_full_logits():
    hidden = torch.randn(2, 64, 8, requires_grad=True)
    weight = torch.randn(500, 8, requires_grad=True)
    targets = torch.randint(0, 500, (2, 64))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        psft_torch.chunked.chunked_token_logprobs(hidden, weight, targets, chunk_size=16).sum().backward()
    assert max(saved) < 2 * 64 * 500  # nothing of [B*T, V] size is kept for backward


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_mlx_chunked_matches_direct(chunk_size):
    hidden, weight, targets, bias = (mx.array(a) for a in _data())

    def direct(h, w):
        return mlx_logprobs(h @ w.T + bias, targets).sum()

    def chunked(h, w):
        return psft_mlx.chunked.chunked_token_logprobs(h, w, targets, bias=bias, chunk_size=chunk_size).sum()

    (v1, g1), (v2, g2) = (mx.value_and_grad(f, argnums=(0, 1))(hidden, weight) for f in (direct, chunked))
    assert abs(v1.item() - v2.item()) < 1e-4
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=0, atol=1e-5)


def test_chunk_size_is_validated():
    with pytest.raises(ValueError, match="chunk_size"):
        psft_torch.chunked.chunked_token_logprobs(
            torch.zeros(1, 2, 3), torch.zeros(4, 3), torch.zeros(1, 2, dtype=torch.long), chunk_size=0
        )


# ----- psft_lm_head_chunk_size: the chunked LM head inside a real model's forward ----------------

from transformers import (  # noqa: E402
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaForCausalLM,
)

from psft_plugin.assets import tiny  # noqa: E402
from psft_torch.lm_head import ENTROPY_KWARG, TARGETS_KWARG, install_chunked_head, remove_chunked_head  # noqa: E402
from psft_torch.trainer import aligned_targets  # noqa: E402

VOCAB, HIDDEN = 320, 32
TINY = tiny.decoder_shape(VOCAB, HIDDEN)


def _llama(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny.llama_config(VOCAB, HIDDEN, **overrides)).float()


def _batch(kind: str):
    """``(model kwargs, labels)`` of a ragged (right-padded), packed or prompt-masked batch."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 13), generator=generator)
    labels = ids.clone()
    if kind == "ragged":  # rows of 13, 9 and 5 tokens, padded on the right
        mask = torch.ones_like(ids)
        for row, length in ((1, 9), (2, 5)):
            mask[row, length:], labels[row, length:] = 0, -100
        return {"input_ids": ids, "attention_mask": mask}, labels
    if kind == "packed":  # one row holding sequences of 5, 4 and 4 tokens (positions restart)
        positions = torch.cat([torch.arange(5), torch.arange(4), torch.arange(4)])[None].repeat(3, 1)
        labels[:, [0, 5, 9]] = -100
        return {"input_ids": ids, "position_ids": positions}, labels
    labels[:, :6] = -100  # prompt
    labels[1] = -100  # a row with no response token at all
    return {"input_ids": ids}, labels


def _full(model, inputs, labels):
    targets = aligned_targets(labels)
    logits = model(**inputs).logits
    keep, entropy = targets != -100, torch.zeros(targets.shape)
    entropy[keep] = psft_torch.token_entropy(logits.detach()[keep][None])[0]  # the response rows only, as a [1, N, V]
    return psft_torch.token_logprobs(logits, targets), entropy


def _chunked(model, inputs, labels, chunk_size):
    install_chunked_head(model, chunk_size)
    try:
        outputs = model(**inputs, **{TARGETS_KWARG: aligned_targets(labels), ENTROPY_KWARG: True})
    finally:
        remove_chunked_head(model)
    assert "logits" not in outputs
    return outputs["psft_logp"], outputs["psft_entropy"]


def _grads(model, logp, weights):
    model.zero_grad()
    (logp * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_logprobs_and_gradients(model, inputs, labels, chunk_size, tol=1e-6):
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    logp, entropy = _full(model, inputs, labels)
    expected = _grads(model, logp, weights)
    chunked_logp, chunked_entropy = _chunked(model, inputs, labels, chunk_size)
    got = _grads(model, chunked_logp, weights)
    torch.testing.assert_close(chunked_logp, logp, rtol=0, atol=tol)
    # An entropy of a few nats sums V float32 terms: rounding relative to its size, like the gradients.
    torch.testing.assert_close(chunked_entropy, entropy, rtol=0, atol=tol * max(entropy.abs().max().item(), 1.0))
    assert got.keys() == expected.keys()
    for name in expected:  # summed chunk by chunk: float32 rounding relative to the gradient's size
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=2 * tol * max(scale, 1.0), msg=name)


@pytest.mark.parametrize("kind", ["ragged", "packed", "masked"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_head_equals_full_logits_in_a_real_model(kind, chunk_size):
    """Log-probs, entropies and every parameter's gradient agree to 1e-6 (float32)."""
    inputs, labels = _batch(kind)
    _assert_same_logprobs_and_gradients(_llama(), inputs, labels, chunk_size)


def test_tied_embeddings_and_gradient_checkpointing():
    model = _llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _assert_same_logprobs_and_gradients(model, *_batch("masked"), chunk_size=3)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_model_specific_logit_transforms_are_applied(family):
    """Gemma's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling (set far
    from neutral so that a missing transform would fail by a wide margin)."""
    torch.manual_seed(0)
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=0.5))
    elif family == "cohere":
        model = CohereForCausalLM(CohereConfig(**TINY, logit_scale=4.0))
    else:
        model = GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=0.25))
    _assert_same_logprobs_and_gradients(model.float(), *_batch("masked"), chunk_size=5)


class _HiddenTransform(LlamaForCausalLM):
    """A model that changes its logits after the head in a way no config key announces."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs["logits"] = outputs["logits"] * 2.0
        return outputs


def test_an_unknown_logit_transform_stops_the_run_naming_the_key():
    torch.manual_seed(0)
    model = _HiddenTransform(tiny.llama_config(VOCAB, HIDDEN))
    with pytest.raises(RuntimeError, match="_HiddenTransform changes its logits.*psft_lm_head_chunk_size: 0"):
        _chunked(model, *_batch("masked"), chunk_size=4)


def test_the_head_sees_only_target_positions_chunk_by_chunk_and_no_full_logits_exist():
    model = _llama()
    inputs, labels = _batch("masked")
    targets = aligned_targets(labels)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows.append(output.shape))
    saved = []
    install_chunked_head(model, 4)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logp = model(**inputs, **{TARGETS_KWARG: targets, ENTROPY_KWARG: True})["psft_logp"]
    logp.sum().backward()
    wanted, forward_calls = int((targets != -100).sum()), 1 + -(-int((targets != -100).sum()) // 4)
    (recorded, *chunks), recomputed = rows[:forward_calls], rows[forward_calls:]
    assert recorded == (1, 8, VOCAB)  # the model's own call: real logits for 8 positions (the transform check)
    assert [shape[0] for shape in chunks] == [4] * (wanted // 4) + ([wanted % 4] if wanted % 4 else [])
    assert sorted(recomputed) == sorted(chunks)  # the backward recomputes each chunk once
    install_chunked_head(model, 4)
    rows.clear()
    model(**inputs, **{TARGETS_KWARG: targets})  # checked once: later calls record [B, T, 0]
    assert rows[0] == (*labels.shape, 0)
    remove_chunked_head(model)
    assert max(saved) < labels.numel() * VOCAB  # nothing [B, T, V]-sized is kept for the backward
    assert max(shape.numel() for shape in rows) <= 8 * VOCAB


def test_padded_chunk_count_and_an_empty_batch_keep_the_graph():
    """Sharded engines need the same number of head calls on every rank; a rank with no target
    still calls the head once and backpropagates zeros."""
    model = _llama()
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    hidden = torch.randn(2, 6, HIDDEN)
    targets = torch.full((2, 6), -100)
    targets[0, :3] = torch.tensor([5, 6, 7])
    head = model.lm_head
    plain, _ = psft_torch.chunked.head_token_logprobs(head, hidden, targets, chunk_size=2)
    calls.clear()
    padded, _ = psft_torch.chunked.head_token_logprobs(head, hidden, targets, chunk_size=2, chunks=5)
    assert len(calls) == 5 and torch.equal(padded, plain)
    calls.clear()
    empty, _ = psft_torch.chunked.head_token_logprobs(head, hidden, torch.full((2, 6), -100), chunk_size=2)
    assert len(calls) == 1
    empty.sum().backward()
    assert (empty == 0).all() and (model.lm_head.weight.grad == 0).all()


def test_lora_on_the_lm_head_is_applied_and_trained():
    """PEFT LoRA on `lm_head` (and an attention projection): the chunks go through the adapter.
    lora_B starts at 0, so it is randomised first: otherwise dropping the adapter would pass."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    inputs, labels = _batch("ragged")
    with model.disable_adapter():
        without, _ = _full(model, inputs, labels)
    with_adapter, _ = _full(model, inputs, labels)
    assert (with_adapter - without).abs().max() > 1e-2
    _assert_same_logprobs_and_gradients(model, inputs, labels, chunk_size=4)
    head = model.get_base_model().lm_head
    assert head.lora_B["default"].weight.requires_grad
