"""A tiny Llama model, tokenizer and chat dataset, built offline and deterministically.

Used by the tests, the tiny example configs and the parity suite, so every backend trains the
same weights on the same data without any download:

    python -m psft_plugin.assets.tiny .cache/tiny        # writes .cache/tiny/{model,data}

The model is saved as float32 safetensors with the top-level ``rope_theta`` that mlx-lm reads
(transformers 5 writes only ``rope_parameters``, docs/objective.md section 6). The dataset uses the
``messages`` chat format that both Axolotl (``type: chat_template``) and mlx-lm read.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Optional

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "big", "small", "fast"]


def chat_examples(count: int, seed: int) -> list[dict]:
    """``count`` short arithmetic / word chats of ragged lengths, in the ``messages`` format."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.5:
            prompt, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        else:
            prompt, answer = f"Repeat: {words}", f"{words}."
        examples.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return examples


def write_dataset(out_dir: Path, train: int = 64, valid: int = 16, seed: int = 0) -> Path:
    """Write ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` (the layout mlx-lm expects)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": chat_examples(train, seed),
        "valid": chat_examples(valid, seed + 1),
        "test": chat_examples(valid, seed + 2),
    }
    for split, rows in splits.items():
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out_dir


def build_tokenizer(vocab_size: int = 384, seed: int = 0):
    """A byte-level BPE tokenizer with a ChatML template, trained on the synthetic chats."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [m["content"] for ex in chat_examples(500, seed) for m in ex["messages"]] + ["user", "assistant"]
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def decoder_shape(vocab_size: int, hidden_size: int = 64, layers: int = 2) -> dict[str, Any]:
    """The tiny decoder's shape, as keyword arguments of a transformers config (Llama, Gemma2, ...).

    ``hidden_size`` wide with a ``2 * hidden_size`` MLP, ``layers`` layers of 4 query heads over 2
    key/value heads, 512 positions, no attention dropout.
    """
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.0,
    )


def llama_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, **overrides: Any):
    """A ``LlamaConfig`` of :func:`decoder_shape` with an untied LM head; ``overrides`` win.

    The one tiny Llama of the project: the saved tiny model, the tests' in-memory models and the
    LM-head benchmark's are all built from it.
    """
    from transformers import LlamaConfig

    shape = decoder_shape(vocab_size, hidden_size, layers)
    return LlamaConfig(**{**shape, "rope_theta": 10000.0, "tie_word_embeddings": False, **overrides})


def build_model(out_dir: Path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised (seeded) float32 Llama model and its tokenizer to ``out_dir``."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer(seed=seed)
    config = llama_config(
        len(tokenizer),
        hidden_size,
        layers,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    add_mlx_config_keys(out_dir / "config.json", rope_theta=10000.0)
    return out_dir


def add_mlx_config_keys(config_path: Path, rope_theta: Optional[float] = None) -> None:
    """Add the top-level ``rope_theta`` mlx-lm needs when transformers wrote only ``rope_parameters``."""
    config = json.loads(config_path.read_text())
    if "rope_theta" not in config:
        theta = rope_theta or (config.get("rope_parameters") or {}).get("rope_theta")
        if theta is None:
            raise ValueError(f"{config_path} has neither rope_theta nor rope_parameters.rope_theta")
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def build(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Build ``out_dir/model`` and ``out_dir/data`` unless they exist; return both paths."""
    model_dir, data_dir = out_dir / "model", out_dir / "data"
    if not (model_dir / "model.safetensors").exists():
        build_model(model_dir, seed=seed)
    if not (data_dir / "train.jsonl").exists():
        write_dataset(data_dir, seed=seed)
    return model_dir, data_dir


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny offline model and dataset.")
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path(".cache/tiny"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model_dir, data_dir = build(args.out_dir, seed=args.seed)
    print(f"model: {model_dir}\ndata: {data_dir}")


if __name__ == "__main__":
    main()
