"""docs/mlx.md shows the configuration tables generated from the declarations; the example configs validate."""

from pathlib import Path

import pytest

from psft_plugin.mlx_train.config import docs_tables, load_config
from psft_plugin.options import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_docs_tables_are_generated_from_the_declarations():
    assert docs_tables() in (ROOT / "docs" / "mlx.md").read_text()


def test_tiny_config_validates(tiny):
    cfg = load_config(
        ["--config", str(ROOT / "configs/mlx/tiny.yaml"), "--model", str(tiny[0]), "--data", str(tiny[1])]
    )
    assert cfg.settings.objective.name == "psft" and cfg.psft["psft_refresh_steps"] == 4 and cfg.train


def test_smollm2_config_has_no_problem_but_its_absent_paths(tmp_path):
    """Every key is known and valid; only the model/data folders (built by other commands) may be missing."""
    try:
        cfg = load_config(["--config", str(ROOT / "configs/mlx/smollm2.yaml")])
    except ConfigError as error:
        assert all("does not exist" in p and p.startswith(("`model:", "`data:")) for p in error.problems), error
    else:
        assert cfg.settings.objective.name == "psft" and cfg.train
    with pytest.raises(ConfigError) as error:  # the same file with only the paths replaced
        load_config(["--config", str(ROOT / "configs/mlx/smollm2.yaml"), "--model", str(tmp_path)])
    assert any("config.json" in p for p in error.value.problems)
