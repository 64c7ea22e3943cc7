"""One `mlx_lm.lora` YAML, two trainers: `loss: ce` gives mlx-lm's own run (docs/objective.md section 8).

mlx-lm runs through its own CLI code (`mlx_lm.lora.run`: its defaults, optimizer, seeds,
LoRA initialisation, data order and `train`), with one change: its loss mask counts one
padding position per sequence (`steps <= length`), ours does not, so mlx-lm's `train` gets
the corrected mask. The data has one length, so every micro-batch holds the same number of
tokens and mlx-lm's mean of micro-batch means equals our token-mean over the step (GA 2).
"""

import functools
import json
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml

from psft_plugin import mlx_train

ITERS, GA, REPORT, SAVE = 12, 2, 4, 6  # 12 iterations = 6 optimizer steps = 3 epochs of 4 batches


def fixed_loss(model, batch, lengths):
    """mlx-lm's ``default_loss`` with the mask ending at the last real token (``<`` for ``<=``)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def equal_length_texts(model_dir: Path, count: int = 16) -> list[dict]:
    """``count`` text rows that tokenize to the same length (so micro-batches hold equal token counts)."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    by_length: dict[int, list[str]] = {}
    for a in range(2, 40):
        for b in range(2, 12):
            text = f"{a} plus {b} is {a + b}."
            by_length.setdefault(len(tokenizer.encode(text)), []).append(text)
    texts = max(by_length.values(), key=len)
    assert len(texts) >= count
    rng = np.random.default_rng(0)
    return [{"text": t} for t in rng.choice(texts, size=count, replace=False)]


@pytest.fixture(scope="module")
def yaml_file(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    (root / "data").mkdir()
    rows = equal_length_texts(tiny[0])
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": str(tiny[0]),
        "data": str(root / "data"),
        "train": True,
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
        "batch_size": 4,
        "iters": ITERS,
        "grad_accumulation_steps": GA,
        "learning_rate": 1e-3,
        "optimizer": "Adam",
        "steps_per_report": REPORT,
        "steps_per_eval": 1000,
        "save_every": SAVE,
        "max_seq_length": 64,
        "clear_cache_threshold": "1GB",
        "seed": 3,
        "loss": "ce",
    }
    path = root / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Collect:
    def __init__(self):
        self.train = []

    def on_train_loss_report(self, info):
        self.train.append(info)

    def on_val_loss_report(self, info):
        pass


def run_mlx_lm(yaml_file: Path, adapter_path: Path, monkeypatch, loss=fixed_loss) -> list[dict]:
    """``mlx_lm.lora --config yaml_file``, as its ``main`` reads it, with ``loss`` passed to its ``train``."""
    import mlx_lm.lora as lora
    from mlx_lm.tuner import trainer

    args = vars(lora.build_parser().parse_args(["--adapter-path", str(adapter_path)]))
    for key, value in yaml.load(yaml_file.read_text(), lora.yaml_loader).items():
        if args.get(key) is None:
            args[key] = value
    for key, value in lora.CONFIG_DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    collect = Collect()
    monkeypatch.setattr(lora, "train", functools.partial(_train_with, trainer.train, loss, collect))
    lora.run(types.SimpleNamespace(**args))
    return collect.train


def _train_with(train, loss, collect, **kwargs):
    return train(**{**kwargs, "loss": loss, "training_callback": collect})


def _max_diff(a_dir: Path, b_dir: Path, name: str = "adapters.safetensors") -> float:
    a, b = mx.load(str(a_dir / name)), mx.load(str(b_dir / name))
    assert a.keys() == b.keys() and a
    return max(float(mx.abs(a[k] - b[k]).max()) for k in a)


def test_loss_ce_reproduces_mlx_lm_lora_on_the_same_yaml(yaml_file, tmp_path, monkeypatch):
    theirs = run_mlx_lm(yaml_file, tmp_path / "mlx_lm", monkeypatch)
    assert mlx_train.main(["--config", str(yaml_file), "--adapter-path", str(tmp_path / "ours")]) == 0
    ours = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    ours = [r for r in ours if r["kind"] == "train"]

    assert [r["iteration"] for r in ours] == [r["iteration"] for r in theirs] == [4, 8, 12]
    for a, b in zip(ours, theirs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"])
    final = _max_diff(tmp_path / "ours", tmp_path / "mlx_lm")
    checkpoint = _max_diff(tmp_path / "ours", tmp_path / "mlx_lm", f"{SAVE:07d}_adapters.safetensors")
    moved = max(
        float(mx.abs(v).max())
        for k, v in mx.load(str(tmp_path / "ours" / "adapters.safetensors")).items()
        if k.endswith("lora_b")
    )  # LoRA B starts at 0
    print(
        f"max |ours - mlx_lm| adapters: final {final:.2e}, iteration {SAVE} {checkpoint:.2e}; max |lora_b| {moved:.2e}"
    )
    assert final <= 1e-5 and checkpoint <= 1e-5
    assert moved > 1e-3  # the run really moved the adapters


def test_the_comparison_sees_mlx_lm_default_mask(yaml_file, tmp_path, monkeypatch):
    """The same comparison against mlx-lm's own off-by-one mask: the adapters differ far beyond 1e-5."""
    from mlx_lm.tuner.trainer import default_loss

    run_mlx_lm(yaml_file, tmp_path / "mlx_lm", monkeypatch, loss=default_loss)
    assert mlx_train.main(["--config", str(yaml_file), "--adapter-path", str(tmp_path / "ours")]) == 0
    diff = _max_diff(tmp_path / "ours", tmp_path / "mlx_lm")
    print(f"max |ours - mlx_lm with its default mask| = {diff:.2e}")
    assert diff > 1e-4


def test_a_resume_trains_iters_more_iterations_as_mlx_lm_lora_does(yaml_file, tmp_path, monkeypatch):
    """The YAML plus `resume_adapter_file`: mlx_lm.lora trains `iters` more iterations (its counter restarts at
    1); ours trains as many, its counter continuing from the checkpoint's iteration."""
    assert (
        mlx_train.main(["--config", str(yaml_file), "--adapter-path", str(tmp_path / "a"), "--iters", str(SAVE)]) == 0
    )
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(yaml_file.read_text() + f"resume_adapter_file: {tmp_path / 'a' / 'adapters.safetensors'}\n")
    theirs = run_mlx_lm(resumed, tmp_path / "mlx_lm", monkeypatch)
    assert mlx_train.main(["--config", str(resumed), "--adapter-path", str(tmp_path / "b")]) == 0
    ours = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    ours = [r["iteration"] for r in ours if r["kind"] == "train"]
    assert [r["iteration"] for r in theirs] == list(range(REPORT, ITERS + 1, REPORT))
    assert ours == [it for it in range(SAVE + 1, SAVE + ITERS) if it % REPORT == 0] + [SAVE + ITERS]
    assert ours[-1] - SAVE == theirs[-1]["iteration"] == ITERS
