"""The MLX tests' real CLI runs: the runner (an 80-column terminal), the shared flags and readers.

Each run costs a process start and a model load, so conftest.py makes the shared ones once per
session: ``lora_run`` (the shipped tiny YAML, checked by test_mlx_e2e.py and
test_mlx_lora_meaning.py) and ``ce_run`` (its SFT baseline, checked by test_mlx_dft.py and
test_mlx_e2e.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs/mlx/tiny.yaml"
COLUMNS = 80
PSFT_ONLY_KEYS = ("psft_epsilon_low", "psft_epsilon_high", "psft_refresh_steps", "psft_warmup_steps")
LORA_FLAGS = ("--iters", "9", "--learning-rate", "0.05", "--val-batches", "-1", "--psft-refresh-steps", "2")
"""``lora_run``: the tiny YAML (GA 2, reports every 2 iterations, checkpoints and validation every 4) for
9 iterations, 8 of them trained, in 2-step windows (so a resume at iteration 4 is exact)."""
SFT_KEYS = {"iters": 8, "learning_rate": 5e-2, "steps_per_eval": 100, "save_every": 100}
"""``ce_run`` and the runs compared with it: the tiny YAML's other keys, 4 optimizer steps."""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m psft_plugin.mlx_train ARGS`` in a subprocess from the repo root, in an 80-column terminal."""
    env = {**os.environ, "COLUMNS": str(COLUMNS)}
    command = [sys.executable, "-m", "psft_plugin.mlx_train", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def reports(adapter_dir: Path, kind: str) -> list[dict]:
    """The ``kind`` (``train`` or ``val``) lines of ``adapter_dir/metrics.jsonl``."""
    lines = (adapter_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == kind]


def train_cli(tiny, adapter_dir: Path, *flags: str, config: Path = TINY_YAML) -> str:
    """Train with ``config`` on the tiny model and data into ``adapter_dir``; the console output."""
    model, data = tiny
    result = run_cli(
        "--config", str(config), "--model", str(model), "--data", str(data), "--adapter-path", str(adapter_dir), *flags
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def sft_yaml(folder: Path, loss: str) -> Path:
    """The tiny YAML without its PSFT keys, with ``loss`` and :data:`SFT_KEYS`, written into ``folder``."""
    cfg = {key: value for key, value in yaml.safe_load(TINY_YAML.read_text()).items() if key not in PSFT_ONLY_KEYS}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{loss}.yaml"
    path.write_text(yaml.safe_dump({**cfg, **SFT_KEYS, "loss": loss}))
    return path
