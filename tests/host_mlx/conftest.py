"""Shared fixtures of the MLX trainer tests: the tiny model and data, built once per session."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny(tiny_assets) -> tuple[Path, Path]:
    """``(model_dir, data_dir)`` of the tiny Llama + chat data (the session's ``tiny_assets``)."""
    return tiny_assets


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "psft_plugin.mlx_train", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args)``: ``python -m psft_plugin.mlx_train ARGS`` in a subprocess from the repo root."""
    return _run_cli
