"""ms-swift tests: a clean environment per test (``psft-swift`` sets its configuration variable in-process)."""

import os

import pytest


@pytest.fixture(autouse=True)
def unchanged_environment():
    """Restore ``os.environ`` after each test, whatever the code under test wrote into it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
