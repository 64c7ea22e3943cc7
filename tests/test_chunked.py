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
    return (rng.normal(size=(b, t, h)).astype(np.float32), rng.normal(size=(v, h)).astype(np.float32) * 0.3,
            targets, rng.normal(size=(v,)).astype(np.float32))


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
        psft_torch.chunked.chunked_token_logprobs(torch.zeros(1, 2, 3), torch.zeros(4, 3), torch.zeros(1, 2, dtype=torch.long), chunk_size=0)
