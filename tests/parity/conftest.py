"""One tiny Llama saved once; the same weights loaded by transformers and mlx-lm, in float32."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_assets):
    return tiny_assets[0]


@pytest.fixture(scope="session")
def batch():
    """Ragged right-padded ids ``[4, 12]``, aligned targets/mask ``[4, 11]`` (prompt and padding masked)."""
    rng = np.random.default_rng(0)
    lengths, prompts = [12, 9, 6, 11], [3, 2, 4, 5]
    ids = np.zeros((4, 12), dtype=np.int64)
    mask = np.zeros((4, 11), dtype=np.float32)
    for row, (length, prompt) in enumerate(zip(lengths, prompts)):
        ids[row, :length] = rng.integers(3, 373, size=length)
        mask[row, prompt - 1 : length - 1] = 1.0  # position t predicts ids[t + 1]
    targets = np.where(mask > 0, ids[:, 1:], -100)
    return {"ids": ids, "targets": targets, "mask": mask}
