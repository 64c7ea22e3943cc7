"""PSFT vs SFT step time and peak memory on the torch backend (a worker of ``psft_plugin.bench``).

SFT is the plain ``transformers.Trainer`` (the model's own loss); PSFT is
:class:`psft_torch.trainer.PSFTTrainer` with ``loss: psft``. Both train the same model from the
same weights on the same batch, alternating (SFT, PSFT, PSFT, SFT, ...), so drift in machine
speed hits both. A step's time is the interval between consecutive ``on_step_end`` callbacks,
so PSFT's refresh (stamping in ``get_batch_samples``) is counted in the step it precedes. The
first window of every run is left out (thread pools, allocator warm-up).

    python -m psft_plugin.bench.steps_torch MODEL_DIR '{"batch_size": 4, ...}'   # prints JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from psft_plugin.bench.memory import interleaved, torch_peak_bytes
from psft_torch.trainer import PSFTTrainer


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall-clock seconds between consecutive optimizer steps (the device synchronized at each)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.last = 0.0
        self.intervals: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        now = time.perf_counter()
        self.intervals.append(now - self.last)
        self.last = now


def bench_training_args(
    out_dir: str, max_steps: int, batch_size: int, learning_rate: float, device: str = "cpu", bf16: bool = False
) -> TrainingArguments:
    """``TrainingArguments`` for a timed run on ``device`` (``cpu`` or ``cuda``; ``bf16``: mixed precision):
    no logging, saving, progress bar or loader workers, seed 0."""
    return TrainingArguments(
        output_dir=out_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        bf16=bf16,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def fixed_batch(vocab: int, batch_size: int, seq_len: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps * batch_size`` copies of one random batch (the prompt's first quarter masked)."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
    labels = rows.clone()
    labels[:, : seq_len // 4] = -100
    return [
        {
            "input_ids": rows[i % batch_size],
            "labels": labels[i % batch_size],
            "attention_mask": torch.ones(seq_len, dtype=torch.long),
        }
        for i in range(steps * batch_size)
    ]


def _train(model, initial: dict, dataset: list, setup: dict[str, Any], psft: bool, out_dir: str):
    model.load_state_dict(initial)
    device, bf16 = setup.get("device", "cpu"), setup.get("dtype") == "bfloat16"
    timer = StepTimer(device)
    args = bench_training_args(
        out_dir, setup["refresh_steps"] * setup["windows"], setup["batch_size"], 1e-5, device=device, bf16=bf16
    )
    kwargs = dict(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    if psft:
        trainer = PSFTTrainer(**kwargs, psft_config={"loss": "psft", "psft_refresh_steps": setup["refresh_steps"]})
    else:
        trainer = Trainer(**kwargs)
    peak = torch_peak_bytes(trainer.train, device)
    return timer.intervals[setup["refresh_steps"] :], peak


def _forward_seconds(model, batch: dict[str, torch.Tensor], repeats: int = 3) -> float:
    """Median time of one no-grad eval-mode forward (what a refresh costs per micro-batch)."""
    from psft_torch import token_logprobs

    model.eval()
    device = str(model.device)
    batch = {key: value.to(model.device) for key, value in batch.items()}
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            synchronize(device)
            tic = time.perf_counter()
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            token_logprobs(logits, batch["labels"][:, 1:])
            synchronize(device)
            times.append(time.perf_counter() - tic)
    model.train()
    return statistics.median(times)


def measure(model_dir: str, setup: dict[str, Any]) -> dict[str, Any]:
    """Step times, forward time and peaks of SFT and PSFT, interleaved over ``setup["rounds"]``.

    ``setup`` may name a ``device`` (default ``cpu``) and a ``dtype`` (default ``float32``;
    ``bfloat16`` loads the weights in bf16 and trains with bf16 mixed precision, as Axolotl's
    ``bf16: true`` does)."""
    torch.manual_seed(0)
    dtype = getattr(torch, setup.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(setup.get("device", "cpu"))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    steps = setup["refresh_steps"] * setup["windows"]
    dataset = fixed_batch(model.config.vocab_size, setup["batch_size"], setup["seq_len"], steps)
    batch = {k: torch.stack([row[k] for row in dataset[: setup["batch_size"]]]) for k in ("input_ids", "labels")}
    with tempfile.TemporaryDirectory() as out_dir:
        raw = interleaved(
            setup["rounds"],
            lambda mode: _train(model, initial, dataset, setup, mode == "psft", out_dir),
            lambda: _forward_seconds(model, batch),
        )
    return {"backend": "torch", **raw}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], json.loads(sys.argv[2]))))
