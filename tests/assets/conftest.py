"""Session fixtures for the demo assets: the SmolLM2 build is cached under the repo's git-ignored
``.cache/smollm2`` (shared with the demo), so only the first run pays the ~1 minute build."""

from pathlib import Path

import pytest

from psft_plugin.assets import demo_data, smollm2

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smollm2_dir():
    """The model folder, built on first use."""
    return smollm2.build(ROOT / ".cache" / "smollm2")


@pytest.fixture(scope="session")
def smollm2_verification(smollm2_dir):
    return smollm2.verify(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The default demo data, built once into a temporary folder."""
    return demo_data.build_datasets(tmp_path_factory.mktemp("demo_data"))
