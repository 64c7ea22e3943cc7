"""The tiny offline model and data: deterministic, and loadable by both libraries."""

import hashlib
import json

import mlx.core as mx
import numpy as np
import torch

from psft_plugin.assets import tiny


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_build_is_deterministic_and_loads_in_both_libraries(tmp_path):
    model_a, data_a = tiny.build(tmp_path / "a")
    model_b, data_b = tiny.build(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(model_a / name) == _digest(model_b / name), name
    assert _digest(data_a / "train.jsonl") == _digest(data_b / "train.jsonl")
    assert json.loads((model_a / "config.json").read_text())["rope_theta"] == 10000.0

    from mlx_lm import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_a)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    hf_logits = AutoModelForCausalLM.from_pretrained(model_a)(torch.tensor([ids])).logits.detach().numpy()
    mlx_model, _ = load(str(model_a))
    mlx_logits = np.array(mlx_model(mx.array([ids])))
    np.testing.assert_allclose(mlx_logits, hf_logits, atol=1e-4)  # same weights, same architecture


def test_add_mlx_config_keys_fills_rope_theta_from_rope_parameters(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"rope_parameters": {"rope_theta": 5e5}}))
    tiny.add_mlx_config_keys(path)
    assert json.loads(path.read_text())["rope_theta"] == 5e5
