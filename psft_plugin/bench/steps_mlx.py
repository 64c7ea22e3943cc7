"""PSFT vs SFT step time and peak memory on the MLX backend (a worker of ``psft_plugin.bench``).

Both modes run :func:`psft_mlx.trainer.train` (SFT as ``loss: ce``; mlx-lm's own trainer has
no PSFT and a different loss mask) on the same model, weights and batch, alternating. Each
report covers one refresh window (``steps_per_report = K``), so its time includes the refresh.
The first window of every run is left out (warm-up).

Times are the process's CPU seconds (``time.process_time``) as well as wall-clock seconds:
on a shared machine the wall clock of the same window varies by up to 2x between rounds,
while the CPU time of single-threaded MLX CPU work does not. ``step_seconds`` (used for R
and B) is CPU time; ``wall_step_seconds`` is the wall clock.

``--vs-mlx-lm`` instead times ``loss: ce`` against mlx-lm's own ``train`` (LoRA as
``mlx_lm.lora`` sets it up, the mask fixed so both count the same tokens) on the same batch:

    python -m psft_plugin.bench.steps_mlx MODEL_DIR '{"batch_size": 4, ...}' [--vs-mlx-lm]   # prints JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm import load

from psft_mlx.data import to_micro_batch
from psft_mlx.trainer import LoopArgs, model_logprobs, train
from psft_plugin import get_objective
from psft_plugin.bench.memory import interleaved, mlx_peak_bytes
from psft_plugin.config import resolve


class WindowTimes:
    """CPU and wall seconds per iteration of each report window (the time between reports)."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.tokens_per_second: list[float] = []
        self.last = (time.process_time(), time.perf_counter())

    def on_train_loss_report(self, info: dict) -> None:
        now = (time.process_time(), time.perf_counter())
        self.cpu.append(now[0] - self.last[0])
        self.wall.append(now[1] - self.last[1])
        self.tokens_per_second.append(info["tokens_per_second"])
        self.last = now

    def on_val_loss_report(self, info: dict) -> None:
        pass

    def per_iteration(self, iterations: int) -> tuple[list[float], list[float]]:
        """(CPU, wall) seconds per iteration of every window but the first (warm-up)."""
        return [t / iterations for t in self.cpu[1:]], [t / iterations for t in self.wall[1:]]


def fixed_batch(vocab: int, batch_size: int, seq_len: int):
    """One random batch as ``(tokens [B, L+1], lengths [B, 2])`` (the first quarter of each row is prompt)."""
    mx.random.seed(0)
    tokens = mx.random.randint(3, vocab, (batch_size, seq_len + 1))
    lengths = mx.array([[seq_len // 4, seq_len + 1]] * batch_size)
    return tokens, lengths


def _train(model, initial: list, batch, setup: dict[str, Any], loss: str) -> tuple[list[float], int, list[float]]:
    model.load_weights(initial)
    window = {"psft_refresh_steps": setup["refresh_steps"]} if get_objective(loss).uses_old_policy else {}
    settings = resolve({"loss": loss, **window})
    steps = setup["refresh_steps"] * setup["windows"]
    args = LoopArgs(
        iters=steps, steps_per_report=setup["refresh_steps"], steps_per_eval=10**9, save_every=10**9, compile=False
    )
    timer = WindowTimes()
    batches = (to_micro_batch(*batch) for _ in range(steps))
    peak = mlx_peak_bytes(
        lambda: train(
            model,
            optim.AdamW(learning_rate=1e-5, bias_correction=True),
            batches,
            settings,
            args,
            callback=timer,
        )
    )
    cpu, wall = timer.per_iteration(setup["refresh_steps"])
    return cpu, peak, wall


def _forward_seconds(model, batch, repeats: int = 3) -> float:
    """Median CPU time of one eval-mode forward plus log-probs (a refresh's cost per micro-batch)."""
    mb = to_micro_batch(*batch)
    model.eval()
    times = []
    for _ in range(repeats):
        tic = time.process_time()
        mx.eval(model_logprobs(model, mb.inputs, mb.targets)[0])
        times.append(time.process_time() - tic)
    model.train()
    return statistics.median(times)


def measure(model_dir: str, setup: dict[str, Any]) -> dict[str, Any]:
    """Per-step times (window averages), forward time and peaks of SFT and PSFT, interleaved."""
    model, _ = load(model_dir)
    initial = [(name, mx.array(value)) for name, value in tree_flatten(model.parameters())]
    batch = fixed_batch(model.args.vocab_size, setup["batch_size"], setup["seq_len"])
    wall: dict[str, list[float]] = {"sft": [], "psft": []}

    def run(mode: str) -> tuple[list[float], int]:
        cpu, peak, seconds = _train(model, initial, batch, setup, "ce" if mode == "sft" else "psft")
        wall[mode] += seconds
        return cpu, peak

    raw = interleaved(setup["rounds"], run, lambda: _forward_seconds(model, batch))
    return {"backend": "mlx", "clock": "process CPU seconds", **raw, "wall_step_seconds": wall}


def _lora_model(model_dir: str) -> nn.Module:
    """The model with mlx_lm.lora's LoRA (seed 0, rank 8, scale 20, every block), as both trainers get it."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(model_dir)
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    return model


def _fixed_mask_loss(model, batch, lengths):
    """mlx-lm's ``default_loss`` counting the real tokens only, as ours does (``<`` for its ``<=``)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    ce = nn.losses.cross_entropy(model(inputs), targets) * mask
    return ce.astype(mx.float32).sum() / mask.sum(), mask.sum()


def _time_mlx_lm(model_dir: str, batch, iters: int, report: int) -> WindowTimes:
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_lm_train

    timer = WindowTimes()
    with tempfile.TemporaryDirectory() as folder:  # its train saves the adapters at the end
        mlx_lm_train(
            _lora_model(model_dir),
            optim.Adam(learning_rate=1e-5),
            [],
            None,
            TrainingArgs(
                batch_size=int(batch[0].shape[0]),
                iters=iters,
                steps_per_report=report,
                steps_per_eval=10**9,
                steps_per_save=10**9,
                adapter_file=f"{folder}/adapters.safetensors",
            ),
            loss=_fixed_mask_loss,
            iterate_batches=lambda **_: iter(lambda: batch, None),
            training_callback=timer,
        )
    return timer


def _time_ours(model_dir: str, batch, iters: int, report: int) -> WindowTimes:
    timer = WindowTimes()
    train(
        _lora_model(model_dir),
        optim.Adam(learning_rate=1e-5),
        (to_micro_batch(*batch) for _ in range(iters)),
        resolve({"loss": "ce"}),
        LoopArgs(iters=iters, steps_per_report=report, steps_per_eval=10**9, save_every=10**9, compile=False),
        callback=timer,
    )
    return timer


def versus_mlx_lm(model_dir: str, setup: dict[str, Any]) -> dict[str, Any]:
    """``loss: ce`` vs mlx-lm's ``train``: seconds per iteration on one batch, alternating runs.

    Both count the batch's response tokens (mlx-lm through the corrected mask), so tokens/s
    is tokens per batch / seconds per iteration for both.
    """
    model, _ = load(model_dir)
    batch = fixed_batch(model.args.vocab_size, setup["batch_size"], setup["seq_len"])
    tokens = to_micro_batch(*batch).tokens
    iters, report = 5 * setup["refresh_steps"], setup["refresh_steps"]
    runners: dict[str, Callable] = {"mlx_lm": _time_mlx_lm, "ours": _time_ours}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    wall: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(setup["rounds"] + 1):
        for name in runners if round_index % 2 == 0 else reversed(list(runners)):
            c, w = runners[name](model_dir, batch, iters, report).per_iteration(report)
            cpu[name] += c
            wall[name] += w
    per_iteration = {name: statistics.median(values) for name, values in cpu.items()}
    return {
        "backend": "mlx",
        "tokens_per_iteration": tokens,
        "cpu_seconds_per_iteration": cpu,
        "wall_seconds_per_iteration": wall,
        "tokens_per_second": {name: tokens / seconds for name, seconds in per_iteration.items()},
        "ours_over_mlx_lm": per_iteration["mlx_lm"] / per_iteration["ours"],
    }


if __name__ == "__main__":
    worker = versus_mlx_lm if "--vs-mlx-lm" in sys.argv[3:] else measure
    print(json.dumps(worker(sys.argv[1], json.loads(sys.argv[2]))))
