"""LLaMA-Factory tests: the tiny model and its chat data registered for LLaMA-Factory, and a clean environment.

``psft-llamafactory`` sets ``DISABLE_VERSION_CHECK`` in ``os.environ`` when it runs in-process (the
configuration tests); each test gets the environment back as it was.
"""

import os

import pytest
from llamafactory_runs import register_dataset


@pytest.fixture(autouse=True)
def unchanged_environment():
    """Restore ``os.environ`` after each test, whatever the code under test wrote into it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def lf_assets(tiny_assets):
    """``(model_dir, data_dir)``: the tiny assets, the data registered in ``dataset_info.json``."""
    model_dir, data_dir = tiny_assets
    return model_dir, register_dataset(data_dir)
