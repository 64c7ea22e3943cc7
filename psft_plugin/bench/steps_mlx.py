"""PSFT vs SFT step time and peak memory on the MLX backend (a worker of ``psft_plugin.bench``).

Both modes run :func:`psft_mlx.trainer.train` (SFT as ``loss: ce``; mlx-lm's own trainer has
no PSFT and a different loss mask) on the same model, weights and batch, alternating. Each
report covers one refresh window (``steps_per_report = K``), so its time includes the refresh.
The first window of every run is left out (warm-up).

    python -m psft_plugin.bench.steps_mlx MODEL_DIR '{"batch_size": 4, ...}'   # prints JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm import load

from psft_mlx.data import to_micro_batch
from psft_mlx.trainer import LoopArgs, model_logprobs, train
from psft_plugin import get_objective
from psft_plugin.bench.memory import interleaved, mlx_peak_bytes


class WindowTimes:
    """Seconds per optimizer step of each report (one report = one window)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_loss_report(self, info: dict) -> None:
        self.seconds.append(1.0 / info["iterations_per_second"])

    def on_val_loss_report(self, info: dict) -> None:
        pass


def fixed_batch(vocab: int, batch_size: int, seq_len: int):
    """One random batch as a micro-batch (the first quarter of each row is prompt)."""
    mx.random.seed(0)
    tokens = mx.random.randint(3, vocab, (batch_size, seq_len + 1))
    lengths = mx.array([[seq_len // 4, seq_len + 1]] * batch_size)
    return to_micro_batch(tokens, lengths)


def _train(model, initial: list, batch, setup: dict[str, Any], loss: str) -> tuple[list[float], int]:
    model.load_weights(initial)
    objective = get_objective(loss)
    options = objective.resolve({"psft_refresh_steps": setup["refresh_steps"]})
    steps = setup["refresh_steps"] * setup["windows"]
    args = LoopArgs(iters=steps, steps_per_report=setup["refresh_steps"], steps_per_eval=10**9,
                    save_every=10**9, compile=False)
    timer = WindowTimes()
    batches = (to_micro_batch_copy(batch) for _ in range(steps))
    peak = mlx_peak_bytes(lambda: train(model, optim.AdamW(learning_rate=1e-5, bias_correction=True), batches,
                                        objective, options, args, callback=timer))
    return timer.seconds[1:], peak


def to_micro_batch_copy(batch):
    """A fresh micro-batch object sharing the arrays (the trainer stamps ``old_logp`` on it)."""
    return type(batch)(batch.inputs, batch.targets, batch.mask, batch.tokens, batch.rows)


def _forward_seconds(model, batch, repeats: int = 3) -> float:
    """Median time of one eval-mode forward plus log-probs (a refresh's cost per micro-batch)."""
    model.eval()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(model_logprobs(model, batch.inputs, batch.targets)[0])
        times.append(time.perf_counter() - tic)
    model.train()
    return statistics.median(times)


def measure(model_dir: str, setup: dict[str, Any]) -> dict[str, Any]:
    """Per-step times (window averages), forward time and peaks of SFT and PSFT, interleaved."""
    model, _ = load(model_dir)
    initial = [(name, mx.array(value)) for name, value in tree_flatten(model.parameters())]
    batch = fixed_batch(model.args.vocab_size, setup["batch_size"], setup["seq_len"])
    raw = interleaved(setup["rounds"], lambda mode: _train(model, initial, batch, setup, "ce" if mode == "sft" else "psft"),
                      lambda: _forward_seconds(model, batch))
    return {"backend": "mlx", **raw}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], json.loads(sys.argv[2]))))
