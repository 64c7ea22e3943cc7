"""Parity levels 1-3: log-probs and entropy, loss vs the spec, gradients (full and LoRA)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import psft_mlx
import psft_torch
from psft_plugin import spec

from .bridge import (
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANK,
    LORA_TARGETS,
    mlx_lora_parameters,
    peft_lora_to_mlx,
    peft_to_mlx_name,
)
from .tolerances import GRAD_REL, LOGPROB_ABS, LOSS_VS_SPEC_REL

pytestmark = pytest.mark.parity
PSFT_ARGS = {"epsilon_low": 0.2, "epsilon_high": 0.28, "agg": "token-mean"}


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


def _mlx_model(model_dir):
    from mlx_lm import load

    model, _ = load(str(model_dir))
    return model


def _old_logp(logp: np.ndarray) -> np.ndarray:
    """Old log-probs away from the current ones, so that both clip edges are crossed."""
    return (logp - np.random.default_rng(1).normal(0, 0.3, size=logp.shape)).astype(np.float32)


def _torch_logp(model, batch):
    logits = model(torch.tensor(batch["ids"])).logits[:, :-1]
    return psft_torch.token_logprobs(logits, torch.tensor(batch["targets"])), logits


def _mlx_logp(model, batch):
    logits = model(mx.array(batch["ids"]))[:, :-1]
    return psft_mlx.token_logprobs(logits, mx.array(batch["targets"])), logits


def test_level1_token_logprobs_and_entropy(tiny_model_dir, batch):
    with torch.no_grad():
        t_logp, t_logits = _torch_logp(_hf_model(tiny_model_dir), batch)
    m_logp, m_logits = _mlx_logp(_mlx_model(tiny_model_dir), batch)
    on = batch["mask"] > 0
    logp_diff = np.abs(t_logp.numpy() - np.array(m_logp))[on].max()
    entropy_diff = np.abs(psft_torch.token_entropy(t_logits).numpy() - np.array(psft_mlx.token_entropy(m_logits)))[
        on
    ].max()
    print(f"level 1: max |logp diff| = {logp_diff:.2e}, max |entropy diff| = {entropy_diff:.2e}")
    assert logp_diff <= LOGPROB_ABS and entropy_diff <= LOGPROB_ABS
    assert t_logp.numpy()[on].std() > 0.05  # a real distribution, not a constant


def test_level2_loss_and_metrics_equal_the_spec(tiny_model_dir, batch):
    with torch.no_grad():
        logp = _torch_logp(_hf_model(tiny_model_dir), batch)[0].numpy()
    old, mask = _old_logp(logp), batch["mask"]
    expected_loss, expected = spec.psft_loss(logp, old, mask, **PSFT_ARGS)
    t_loss, t_metrics = psft_torch.psft_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(mask), **PSFT_ARGS)
    m_loss, m_metrics = psft_mlx.psft_loss(mx.array(logp), mx.array(old), mx.array(mask), **PSFT_ARGS)
    assert expected["clipfrac"] > 0  # the clip is exercised
    worst = 0.0
    for loss, metrics in ((t_loss.item(), t_metrics), (m_loss.item(), m_metrics)):
        worst = max(worst, abs(loss - expected_loss) / max(1, abs(expected_loss)))
        for name, value in expected.items():
            worst = max(worst, abs(metrics[name].item() - value) / max(1, abs(value)))
    print(f"level 2: max relative error of loss and metrics vs the spec = {worst:.2e}")
    assert worst <= LOSS_VS_SPEC_REL


def _torch_grads(model, batch, old) -> dict[str, np.ndarray]:
    logp, _ = _torch_logp(model, batch)
    loss, _ = psft_torch.psft_loss(logp, torch.tensor(old), torch.tensor(batch["mask"]), **PSFT_ARGS)
    loss.backward()
    return {name: p.grad.numpy() for name, p in model.named_parameters() if p.requires_grad}


def _mlx_grads(model, batch, old) -> dict[str, np.ndarray]:
    def loss_fn(model):
        logp, _ = _mlx_logp(model, batch)
        return psft_mlx.psft_loss(logp, mx.array(old), mx.array(batch["mask"]), **PSFT_ARGS)[0]

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    return {name: np.array(g) for name, g in tree_flatten(grads)}


def _compare_grads(torch_grads: dict, mlx_grads: dict, rename=lambda n: n, transpose=lambda n: False) -> float:
    assert torch_grads and len(torch_grads) == len(mlx_grads)
    worst = 0.0
    for name, g in torch_grads.items():
        other = mlx_grads[rename(name)]
        other = other.T if transpose(name) else other
        worst = max(worst, np.linalg.norm(g - other) / max(np.linalg.norm(g), 1e-12))
    return worst


def test_level3_full_gradients(tiny_model_dir, batch):
    hf = _hf_model(tiny_model_dir)
    with torch.no_grad():
        old = _old_logp(_torch_logp(hf, batch)[0].numpy())
    mlx_model = _mlx_model(tiny_model_dir)
    worst = _compare_grads(_torch_grads(hf, batch, old), _mlx_grads(mlx_model, batch, old))
    print(f"level 3 (full): max relative gradient error = {worst:.2e}")
    assert worst <= GRAD_REL


def test_level3_lora_gradients(tiny_model_dir, batch):
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(
        _hf_model(tiny_model_dir),
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(LORA_TARGETS)),
    )
    torch.manual_seed(0)
    for name, p in hf.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0, which would make every A-gradient 0
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        old = _old_logp(_torch_logp(hf, batch)[0].numpy())
    mlx_model = _mlx_model(tiny_model_dir)
    mlx_model.freeze()
    linear_to_lora_layers(mlx_model, len(mlx_model.layers), mlx_lora_parameters())
    lora = [
        (peft_to_mlx_name(n), peft_lora_to_mlx(n, p.detach().numpy()))
        for n, p in hf.named_parameters()
        if p.requires_grad
    ]
    mlx_model.load_weights(lora, strict=False)
    torch_grads = _torch_grads(hf, batch, old)
    worst = _compare_grads(
        torch_grads, _mlx_grads(mlx_model, batch, old), rename=peft_to_mlx_name, transpose=lambda n: ".lora_" in n
    )
    print(f"level 3 (LoRA): max relative gradient error = {worst:.2e}")
    assert worst <= GRAD_REL


def test_bridge_maps_peft_names_and_layouts():
    assert (
        peft_to_mlx_name("base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight")
        == "model.layers.1.self_attn.q_proj.lora_a"
    )
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array(peft_lora_to_mlx("x.lora_A.default.weight", a)).shape == (3, 2)
    assert mlx_lora_parameters()["scale"] == LORA_ALPHA / LORA_RANK
