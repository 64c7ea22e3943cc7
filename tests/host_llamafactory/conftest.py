"""LLaMA-Factory tests: the tiny model and its chat data registered for LLaMA-Factory.

``psft-llamafactory`` sets ``DISABLE_VERSION_CHECK`` in ``os.environ`` when it runs in-process (the
configuration tests); tests/conftest.py gives each test the environment back as it was.
"""

import pytest
from llamafactory_runs import register_dataset


@pytest.fixture(scope="session")
def lf_assets(tiny_assets):
    """``(model_dir, data_dir)``: the tiny assets, the data registered in ``dataset_info.json``."""
    model_dir, data_dir = tiny_assets
    return model_dir, register_dataset(data_dir)
