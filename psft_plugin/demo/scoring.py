"""Held-out scores of a trained model: response NLL, token entropy, out-of-domain prose NLL.

The rows are tokenized once into right-padded NumPy batches; a backend only supplies a forward
``ids [B, T] -> (logp [B, T-1], entropy [B, T-1])`` (position t predicts token t + 1), so torch
and MLX models are scored by the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from psft_plugin.assets.demo_data import read_jsonl

Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Batch:
    """``ids`` ``[B, T]`` int64 (right-padded) and ``mask`` ``[B, T-1]`` over the scored targets."""

    ids: np.ndarray
    mask: np.ndarray


def chat_rows(tokenizer, path: Path, limit: int) -> list[tuple[list[int], int]]:
    """``(ids, first scored target index)`` of the first ``limit`` chats: the assistant turn is scored."""
    rows = []
    for row in read_jsonl(path)[:limit]:
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(
            row["messages"][:-1], tokenize=True, return_dict=False, add_generation_prompt=True
        )
        rows.append((list(full), len(prompt) - 1))
    return rows


def text_rows(tokenizer, path: Path, limit: int) -> list[tuple[list[int], int]]:
    """``(ids, 0)`` of the first ``limit`` plain-text rows: every token after the first is scored."""
    return [(tokenizer(row["text"])["input_ids"], 0) for row in read_jsonl(path)[:limit]]


def batches(rows: list[tuple[list[int], int]], pad_id: int, size: int = 8) -> list[Batch]:
    """Rows sorted by length (little padding) and cut into right-padded batches."""
    rows = sorted(rows, key=lambda row: len(row[0]))
    out = []
    for start in range(0, len(rows), size):
        group = rows[start : start + size]
        width = max(len(ids) for ids, _ in group)
        ids = np.full((len(group), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(group), width - 1), dtype=np.float32)
        for i, (row_ids, first) in enumerate(group):
            ids[i, : len(row_ids)] = row_ids
            mask[i, first : len(row_ids) - 1] = 1.0
        out.append(Batch(ids, mask))
    return out


def score(forward: Forward, data: list[Batch]) -> dict[str, float]:
    """Token-mean NLL (nats) and entropy (nats) over the scored targets of ``data``."""
    nll = entropy = tokens = 0.0
    for batch in data:
        logp, ent = forward(batch.ids)
        nll += float((-logp * batch.mask).sum())
        entropy += float((ent * batch.mask).sum())
        tokens += float(batch.mask.sum())
    return {"nll": nll / tokens, "entropy": entropy / tokens}


def torch_forward(model_dir: Path) -> Forward:
    """Forward of a transformers checkpoint (float32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    from psft_torch import token_entropy, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def forward(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tensor = torch.from_numpy(ids)
        logits = model(input_ids=tensor).logits[:, :-1]
        return token_logprobs(logits, tensor[:, 1:]).numpy(), token_entropy(logits).numpy()

    return forward


def mlx_forward(model_dir: Path, adapter_dir: Optional[Path] = None) -> Forward:
    """Forward of an mlx-lm model, with trained adapters when ``adapter_dir`` is given."""
    import mlx.core as mx
    from mlx_lm import load

    from psft_mlx import token_entropy, token_logprobs

    model, _ = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    model.eval()

    def forward(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = model(mx.array(ids))[:, :-1]
        logp, entropy = token_logprobs(logits, mx.array(ids[:, 1:])), token_entropy(logits)
        mx.eval(logp, entropy)
        return np.array(logp), np.array(entropy)

    return forward
