"""Parity level 4: a whole PSFT run in each backend's real trainer, step for step.

torch: :class:`psft_torch.trainer.PSFTTrainerMixin` on a ``transformers.Trainer`` (the code path
Axolotl users get). MLX: :func:`psft_mlx.trainer.train` (the loop ``psft_plugin.mlx_train`` runs).
Same weights, same rows in the same order and padding, AdamW, GA 2, K = 4, 32 optimizer steps.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from psft_mlx.data import MicroBatch
from psft_mlx.trainer import LoopArgs, train
from psft_plugin.assets.tiny import chat_examples
from psft_plugin.config import resolve
from psft_torch.trainer import PSFTTrainerMixin

from .bridge import ADAMW_WEIGHT_DECAY, mlx_adamw
from .tolerances import TRAJECTORY_CLIPFRAC_ABS, TRAJECTORY_LOSS_ABS, TRAJECTORY_WEIGHT_REL

pytestmark = pytest.mark.parity
STEPS, MICRO_BATCH, GA, K, LR = 32, 2, 2, 4, 5e-4


class SequentialPSFTTrainer(PSFTTrainerMixin, Trainer):
    """The rows in file order, so that MLX can be fed the very same micro-batches."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def _rows(tokenizer) -> list[dict]:
    """STEPS x GA x MICRO_BATCH chat rows of ragged length, prompts masked with -100."""
    rows = []
    for example in chat_examples(STEPS * GA * MICRO_BATCH, seed=7):
        prompt = tokenizer.apply_chat_template(example["messages"][:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(example["messages"], tokenize=False)
        prompt_ids, ids = tokenizer(prompt)["input_ids"], tokenizer(full)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids) :]})
    return rows


PSFT_CONFIG = {"loss": "psft", "psft_refresh_steps": K}


def _torch_run(model_dir, rows, out_dir, psft_config=PSFT_CONFIG):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GA,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=ADAMW_WEIGHT_DECAY,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SequentialPSFTTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        psft_config=psft_config,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = {name: p.detach().numpy() for name, p in model.named_parameters()}
    return [e["psft/objective"] for e in logs], [e.get("psft/clipfrac", 0.0) for e in logs], weights, logs


def _micro_batches(rows, pad_id: int) -> list[MicroBatch]:
    """The collator's padding, shifted: inputs ids[:, :-1], targets ids[:, 1:], mask from labels."""
    batches = []
    for start in range(0, len(rows), MICRO_BATCH):
        group = rows[start : start + MICRO_BATCH]
        width = max(len(r["input_ids"]) for r in group)
        ids = np.array([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in group])
        labels = np.array([r["labels"] + [-100] * (width - len(r["labels"])) for r in group])
        mask = (labels[:, 1:] != -100).astype(np.float32)
        batches.append(
            MicroBatch(
                inputs=mx.array(ids[:, :-1]),
                targets=mx.array(labels[:, 1:]),
                mask=mx.array(mask),
                tokens=int(mask.sum()),
                rows=int((mask.sum(1) > 0).sum()),
            )
        )
    return batches


def _mlx_run(model_dir, rows, pad_id, psft_config=PSFT_CONFIG):
    from mlx_lm import load

    model, _ = load(str(model_dir))
    settings = resolve(psft_config)
    records = train(
        model,
        mlx_adamw(LR, ADAMW_WEIGHT_DECAY),
        _micro_batches(rows, pad_id),
        settings,
        LoopArgs(
            iters=STEPS * GA,
            grad_accumulation_steps=GA,
            steps_per_report=1,
            steps_per_eval=10**9,
            save_every=10**9,
            compile=False,
        ),
    )
    weights = {name: np.array(value) for name, value in tree_flatten(model.parameters())}
    return [r["loss"] for r in records], [r.get("clipfrac", 0.0) for r in records], weights, records


def test_level4_trajectory(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tokenizer)
    t_loss, t_clip, t_weights, _ = _torch_run(tiny_model_dir, rows, tmp_path)
    m_loss, m_clip, m_weights, _ = _mlx_run(tiny_model_dir, rows, tokenizer.pad_token_id)
    assert len(t_loss) == len(m_loss) == STEPS
    loss_diff = max(abs(a - b) for a, b in zip(t_loss, m_loss))
    clip_diff = max(abs(a - b) for a, b in zip(t_clip, m_clip))
    weight_rel = max(np.linalg.norm(w - m_weights[name]) / np.linalg.norm(w) for name, w in t_weights.items())
    global_rel = np.sqrt(
        sum(np.sum((w - m_weights[n]) ** 2) for n, w in t_weights.items())
        / sum(np.sum(w**2) for w in t_weights.values())
    )
    initial = _initial(tiny_model_dir)
    moved = max(np.linalg.norm(w - initial[name]) for name, w in t_weights.items())
    print(
        f"level 4: max |loss diff| = {loss_diff:.2e}, max |clipfrac diff| = {clip_diff:.2e}, "
        f"max per-tensor relative weight diff = {weight_rel:.2e} (whole model {global_rel:.2e}), max clipfrac = {max(t_clip):.3f}"
    )
    assert max(t_clip) > 0.01 and moved > 1e-2  # the run really moves and really clips
    assert loss_diff <= TRAJECTORY_LOSS_ABS
    assert clip_diff <= TRAJECTORY_CLIPFRAC_ABS
    assert weight_rel <= TRAJECTORY_WEIGHT_REL


def _initial(model_dir) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))
