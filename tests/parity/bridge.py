"""Where transformers/PEFT and mlx-lm differ, the one place that reconciles them.

- LoRA: PEFT keeps ``lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]`` with scale
  ``alpha / r``; mlx-lm keeps ``lora_a`` ``[in, r]`` and ``lora_b`` ``[r, out]`` with an explicit
  ``scale``. Initialisations differ (PEFT: B = 0), so parity copies A and B across.
- Optimizer: mlx's AdamW defaults to ``bias_correction=False``; torch always corrects.
- RoPE: mlx-lm reads a top-level ``rope_theta`` (see ``psft_plugin.assets.tiny.add_mlx_config_keys``).
"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np

LORA_RANK = 4
LORA_ALPHA = 8
LORA_TARGETS = ("q_proj", "v_proj")
LORA_DROPOUT = 0.0  # dropout breaks r == 1 after a refresh (docs/objective.md section 6)


def mlx_lora_parameters() -> dict:
    """mlx-lm ``lora_parameters`` equal to PEFT's ``LoraConfig(r=4, lora_alpha=8, q/v, dropout 0)``."""
    return {
        "rank": LORA_RANK,
        "scale": LORA_ALPHA / LORA_RANK,
        "dropout": LORA_DROPOUT,
        "keys": [f"self_attn.{name}" for name in LORA_TARGETS],
    }


def peft_to_mlx_name(name: str) -> str:
    """PEFT parameter name -> mlx-lm name, e.g. ``…q_proj.lora_A.default.weight`` -> ``…q_proj.lora_a``."""
    name = re.sub(r"^base_model\.model\.", "", name)
    name = re.sub(r"\.lora_([AB])\.default\.weight$", lambda m: f".lora_{m.group(1).lower()}", name)
    return name.replace(".base_layer.", ".linear.")


def peft_lora_to_mlx(name: str, tensor: np.ndarray) -> mx.array:
    """A PEFT LoRA matrix in mlx-lm's layout (transposed)."""
    return mx.array(tensor.T.copy() if ".lora_" in name else tensor)


def mlx_adamw(learning_rate: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """mlx AdamW configured like ``torch.optim.AdamW`` (bias correction on)."""
    import mlx.optimizers as optim

    return optim.AdamW(
        learning_rate=learning_rate, betas=list(betas), eps=eps, weight_decay=weight_decay, bias_correction=True
    )


# transformers exempts biases and norm weights from weight decay, mlx's AdamW decays every
# parameter: the trajectory compares AdamW without decay so the two optimizers are the same map.
ADAMW_WEIGHT_DECAY = 0.0
