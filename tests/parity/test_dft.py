"""Parity of ``loss: dft`` between the backends: loss and metrics vs the spec, gradients, a whole run.

The same levels as PSFT's (test_levels, test_trajectory), with the same tolerances.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import AutoTokenizer

import psft_mlx
import psft_torch
from psft_plugin import spec

from .test_levels import _compare_grads, _hf_model, _mlx_logp, _mlx_model, _torch_logp
from .test_trajectory import GA, STEPS, _initial, _mlx_run, _rows, _torch_run
from .tolerances import GRAD_REL, LOSS_VS_SPEC_REL, TRAJECTORY_LOSS_ABS, TRAJECTORY_WEIGHT_REL

pytestmark = pytest.mark.parity
DFT_CONFIG = {"loss": "dft"}


def test_dft_loss_and_metrics_equal_the_spec(tiny_model_dir, batch):
    with torch.no_grad():
        logp = _torch_logp(_hf_model(tiny_model_dir), batch)[0].numpy()
    mask = batch["mask"]
    expected_loss, expected = spec.dft_loss(logp, None, mask)
    t_loss, t_metrics = psft_torch.dft_loss(torch.tensor(logp), None, torch.tensor(mask))
    m_loss, m_metrics = psft_mlx.dft_loss(mx.array(logp), None, mx.array(mask))
    assert set(expected) == set(t_metrics) == set(m_metrics) and 0 < expected["weight_mean"] < 1
    worst = 0.0
    for loss, metrics in ((t_loss.item(), t_metrics), (m_loss.item(), m_metrics)):
        worst = max(worst, abs(loss - expected_loss) / max(1, abs(expected_loss)))
        for name, value in expected.items():
            worst = max(worst, abs(metrics[name].item() - value) / max(1, abs(value)))
    print(f"dft level 2: max relative error of loss and metrics vs the spec = {worst:.2e}")
    assert worst <= LOSS_VS_SPEC_REL


def test_dft_full_gradients(tiny_model_dir, batch):
    hf = _hf_model(tiny_model_dir)
    logp, _ = _torch_logp(hf, batch)
    psft_torch.dft_loss(logp, None, torch.tensor(batch["mask"]))[0].backward()
    torch_grads = {name: p.grad.numpy() for name, p in hf.named_parameters() if p.requires_grad}

    def loss_fn(model):
        return psft_mlx.dft_loss(_mlx_logp(model, batch)[0], None, mx.array(batch["mask"]))[0]

    mlx_model = _mlx_model(tiny_model_dir)
    _, grads = nn.value_and_grad(mlx_model, loss_fn)(mlx_model)
    worst = _compare_grads(torch_grads, {name: np.array(g) for name, g in tree_flatten(grads)})
    print(f"dft level 3 (full): max relative gradient error = {worst:.2e}")
    assert worst <= GRAD_REL


def test_dft_trajectory(tiny_model_dir, tmp_path):
    """32 AdamW steps of `loss: dft` in each backend's trainer: same losses, NLLs and final weights,
    and not CE's run (the weights move elsewhere)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tokenizer)
    t_loss, _, t_weights, t_logs = _torch_run(tiny_model_dir, rows, tmp_path / "dft", DFT_CONFIG)
    m_loss, _, m_weights, m_records = _mlx_run(tiny_model_dir, rows, tokenizer.pad_token_id, DFT_CONFIG)
    assert len(t_loss) == len(m_loss) == STEPS and len(m_records) == STEPS
    loss_diff = max(abs(a - b) for a, b in zip(t_loss, m_loss))
    nll_rel = max(abs(e["psft/nll"] - r["nll"]) / e["psft/nll"] for e, r in zip(t_logs, m_records))
    weight_rel = max(np.linalg.norm(w - m_weights[name]) / np.linalg.norm(w) for name, w in t_weights.items())
    _, _, ce_weights, _ = _torch_run(tiny_model_dir, rows, tmp_path / "ce", {"loss": "ce"})
    from_ce = max(np.linalg.norm(w - ce_weights[name]) / np.linalg.norm(w) for name, w in t_weights.items())
    initial = _initial(tiny_model_dir)
    moved = max(np.linalg.norm(w - initial[name]) for name, w in t_weights.items())
    print(
        f"dft level 4: max |loss diff| = {loss_diff:.2e}, max relative nll diff = {nll_rel:.2e}, max per-tensor "
        f"relative weight diff = {weight_rel:.2e}; torch DFT vs torch CE = {from_ce:.2e}, GA {GA}"
    )
    assert moved > 1e-2 and from_ce > 100 * TRAJECTORY_WEIGHT_REL  # it trains, and trains something else than CE
    assert all(0 < loss < e["psft/nll"] for loss, e in zip(t_loss, t_logs))  # each weight p < 1
    assert all(0 < e["psft/weight_mean"] < 1 for e in t_logs)
    # The objective is below 0.37 (-p log p <= 1/e) but the NLL is ~5 nats: the NLL's bound is relative.
    assert loss_diff <= TRAJECTORY_LOSS_ABS and nll_rel <= TRAJECTORY_LOSS_ABS
    assert weight_rel <= TRAJECTORY_WEIGHT_REL
