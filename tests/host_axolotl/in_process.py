"""The in-process harness of the torch mixin's tests: a plain ``transformers.Trainer`` with the mixin,
sequential data, the tiny model's chat rows tokenised with the prompt masked out, and the
``TrainingArguments`` every such run shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

from psft_torch.trainer import PSFTTrainerMixin


class SequentialTrainer(Trainer):
    """The data order must not depend on the batch split or on a resume, so the runs are comparable."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


class PSFTSequentialTrainer(PSFTTrainerMixin, SequentialTrainer):
    pass


def tokenized_chats(tokenizer: Any, data_dir: Path, split: str = "train", count: int = 32) -> list[dict]:
    """The first ``count`` chat rows of ``split``, tokenised, the prompt masked out (labels -100), ragged lengths."""
    rows = [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()[:count]]
    examples = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        prompt_ids, ids = tokenizer(prompt)["input_ids"], tokenizer(full)["input_ids"]
        examples.append({"input_ids": ids, "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids) :]})
    return examples


def training_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    """CPU, constant learning rate, no weight decay, seed 0, a log line per step, no reports; ``overrides`` win."""
    settings = dict(
        output_dir=str(output_dir),
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})
