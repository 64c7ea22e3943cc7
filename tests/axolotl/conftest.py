"""Shared fixtures of the Axolotl / transformers-trainer tests: the tiny model, built once."""

from pathlib import Path

import pytest

from psft_plugin.assets import tiny


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> tuple[Path, Path]:
    """``(model_dir, data_dir)`` of the offline tiny Llama and its chat data, built in a tmp dir."""
    return tiny.build(tmp_path_factory.mktemp("tiny"))
