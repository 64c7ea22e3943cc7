"""A resume from a checkpoint taken inside an old-policy window reproduces the uninterrupted run.

In process, on a plain ``transformers.Trainer`` with the mixin (every torch host gets this):
K = 4, checkpoints every 2 steps, so ``checkpoint-2`` is in the middle of the window [0, 4) and
``checkpoint-4`` is on a boundary. The window's old log-probs for steps 2 and 3 were stamped with
the weights of step 0; the checkpoint carries them (``psft_window_rank0.pt``). Without the file
the resumed run must say so and drifts; with other micro-batches it must refuse the saved ones.
Through ``axolotl train`` (full and LoRA on one process, FSDP2 and ZeRO-3 on two) it is checked in
``test_axolotl_train.py`` and ``test_engines.py``, which share their runs with other tests.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from in_process import PSFTSequentialTrainer, tokenized_chats, training_args
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from psft_torch.resume import WINDOW_FILE, load, window_file

STEPS, K, SAVE = 6, 4, 2
PSFT = {"loss": "psft", "psft_refresh_steps": K}
WARNING = "was saved inside an old-policy window but its window cannot be restored"


def _train(tiny_assets, out: Path, config: dict, resume: str | None = None) -> dict[str, torch.Tensor]:
    """Train ``STEPS`` steps (micro-batch 2, accumulation 2, lr 1e-2), saving every ``SAVE``; the final weights."""
    model_dir, data_dir = tiny_assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = training_args(
        out,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=SAVE,
    )
    trainer = PSFTSequentialTrainer(
        model=model,
        args=args,
        train_dataset=tokenized_chats(tokenizer, data_dir, "train", 24),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        psft_config=config,
    )
    trainer.train(resume_from_checkpoint=resume)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def _checkpoint_copy(run: Path, step: int, to: Path) -> Path:
    """A copy of ``run``'s ``checkpoint-<step>``, to resume from after changing it."""
    return Path(shutil.copytree(run / f"checkpoint-{step}", to / f"checkpoint-{step}"))


@pytest.fixture(scope="module")
def full_run(tiny_assets, tmp_path_factory):
    """The uninterrupted run: ``(output dir, final weights)``."""
    out = tmp_path_factory.mktemp("resume") / "full"
    return out, _train(tiny_assets, out, PSFT)


def test_the_checkpoint_carries_the_window_left_to_train(full_run):
    out, _ = full_run
    saved = load(out / "checkpoint-2", rank=0)
    assert saved.step == 2 and saved.world_size == 1 and len(saved.groups) == K - 2  # steps 2 and 3
    for group in saved.groups:
        assert len(group) == 2  # the accumulation micro-batches
        for record in group:
            assert record["old_logp"].dtype == torch.float32
            assert record["old_logp"].shape == record["input_ids"].shape == record["labels"].shape
    assert load(out / "checkpoint-4", rank=0).groups == []  # a window boundary: nothing left to restore


def test_resume_inside_a_window_reproduces_the_uninterrupted_run(tiny_assets, tmp_path, full_run, caplog):
    out, full = full_run
    with caplog.at_level(logging.WARNING):
        resumed = _train(tiny_assets, tmp_path / "resumed", PSFT, resume=str(out / "checkpoint-2"))
    diff = _max_diff(resumed, full)
    print(f"resume from checkpoint-2 (inside the window [0, {K})): max |dw| = {diff:.3g}")
    assert diff <= 1e-6
    assert WARNING not in caplog.text


def test_a_checkpoint_without_the_window_resumes_with_a_warning_and_drifts(tiny_assets, tmp_path, full_run, caplog):
    """The proof that the saved window is what makes the resume exact."""
    out, full = full_run
    checkpoint = _checkpoint_copy(out, 2, tmp_path)
    (checkpoint / WINDOW_FILE.format(rank=0)).unlink()
    with caplog.at_level(logging.WARNING):
        resumed = _train(tiny_assets, tmp_path / "resumed", PSFT, resume=str(checkpoint))
    assert WARNING in caplog.text and "psft_window_rank0.pt is missing" in caplog.text
    assert "Steps 2-3 are trained against old log-probs stamped now" in caplog.text
    diff = _max_diff(resumed, full)
    print(f"resume from checkpoint-2 without its window: max |dw| = {diff:.3g}")
    assert diff > 1e-4


def test_saved_old_logprobs_of_other_tokens_are_refused(tiny_assets, tmp_path, full_run, caplog):
    out, _ = full_run
    checkpoint = _checkpoint_copy(out, 2, tmp_path)
    path = window_file(checkpoint, 0)
    data = torch.load(path, weights_only=True)
    data["groups"][1][0]["input_ids"][0, 0] += 1
    torch.save(data, path)
    with caplog.at_level(logging.WARNING):
        _train(tiny_assets, tmp_path / "resumed", PSFT, resume=str(checkpoint))
    assert (
        WARNING in caplog.text
        and "step 3, micro-batch 0: `input_ids` holds other tokens than the saved one" in caplog.text
    )


def test_resume_is_exact_with_the_chunked_lm_head(tiny_assets, tmp_path):
    config = {**PSFT, "psft_lm_head_chunk_size": 5}
    full = _train(tiny_assets, tmp_path / "full", config)
    resumed = _train(tiny_assets, tmp_path / "resumed", config, resume=str(tmp_path / "full" / "checkpoint-2"))
    diff = _max_diff(resumed, full)
    print(f"chunked LM head, resume from checkpoint-2: max |dw| = {diff:.3g}")
    assert diff <= 1e-6


def test_objectives_without_an_old_policy_write_no_window(tiny_assets, tmp_path):
    _train(tiny_assets, tmp_path, {"loss": "ce"})
    assert not list(tmp_path.glob("checkpoint-*/psft_window_rank*.pt"))
