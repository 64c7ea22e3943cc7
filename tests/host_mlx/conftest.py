"""Shared fixtures of the MLX trainer tests: the tiny model and data, and the CLI runs several tests check."""

from pathlib import Path

import mlx_runs
import pytest
from mlx_runs import LORA_FLAGS, sft_yaml, train_cli


@pytest.fixture(scope="session")
def tiny(tiny_assets) -> tuple[Path, Path]:
    """``(model_dir, data_dir)`` of the tiny Llama + chat data (the session's ``tiny_assets``)."""
    return tiny_assets


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args)``: :func:`mlx_runs.run_cli`."""
    return mlx_runs.run_cli


@pytest.fixture(scope="session")
def lora_run(tiny, tmp_path_factory) -> tuple[Path, str]:
    """``(adapter_dir, stdout)`` of the tiny YAML with :data:`LORA_FLAGS` (PSFT, LoRA)."""
    out = tmp_path_factory.mktemp("lora") / "adapters"
    return out, train_cli(tiny, out, *LORA_FLAGS)


@pytest.fixture(scope="session")
def ce_run(tiny, tmp_path_factory) -> tuple[Path, str]:
    """``(adapter_dir, stdout)`` of :func:`sft_yaml` with ``loss: ce``."""
    root = tmp_path_factory.mktemp("ce")
    out = root / "adapters"
    return out, train_cli(tiny, out, config=sft_yaml(root, "ce"))
