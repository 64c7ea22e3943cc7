"""Shared test settings (single-threaded, offline, no telemetry, no MLX JIT) and the tiny assets."""

import os

import pytest

from psft_plugin.assets import tiny

for key, value in {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "MLX_DISABLE_COMPILE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """``(model_dir, data_dir)`` of the offline tiny Llama and its chat data, built once per session."""
    return tiny.build(tmp_path_factory.mktemp("tiny"))
