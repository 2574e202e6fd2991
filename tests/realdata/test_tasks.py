"""Task data: example parsing, the committed manifest, and (slow) deterministic preparation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltastore.realdata.encoding import IGNORE_INDEX, encode_example, render_completion
from deltastore.realdata.evaluate import extract_integer, extract_label
from deltastore.realdata.tasks import SPLITS, TASKS, DataFileError, Example, load_examples, prepare_data

DATA = Path(__file__).resolve().parents[2] / "data"


def test_load_examples_accepts_string_prompt(tmp_path: Path):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n\n")
    [example] = load_examples(path)
    assert example.prompt == [{"role": "user", "content": "hi"}]
    assert example.answer is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2"),
        ('{"prompt": "x"}', "completion"),
        ('{"prompt": [], "completion": "y"}', "non-empty list"),
        ('{"prompt": [{"role": "user"}], "completion": "y"}', "role"),
        ('{"prompt": "x", "completion": 3}', "string"),
        ('["prompt", "completion"]', "JSON object"),
    ],
)
def test_load_examples_rejects_bad_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "completion": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataFileError, match=message):
        load_examples(path)


def test_load_examples_missing_file(tmp_path: Path):
    with pytest.raises(DataFileError, match="does not exist"):
        load_examples(tmp_path / "absent.jsonl")


def test_committed_files_match_manifest():
    import hashlib

    manifest = json.loads((DATA / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(TASKS)
    for name, task in manifest["tasks"].items():
        assert task["seed"] == TASKS[name].seed
        for split in SPLITS:
            info = task["splits"][split]
            text = (DATA / info["path"]).read_text(encoding="utf-8")
            assert "sha256:" + hashlib.sha256(text.encode()).hexdigest() == info["sha256"]
            assert len(load_examples(DATA / info["path"])) == info["examples"] == TASKS[name].sizes[split]


def test_committed_splits_do_not_overlap():
    for name in TASKS:
        prompts = {split: {json.dumps(e.prompt) for e in load_examples(DATA / name / f"{split}.jsonl")} for split in SPLITS}
        assert not prompts["train"] & prompts["test"], name
        assert not prompts["train"] & prompts["validation"], name
        assert not prompts["validation"] & prompts["test"], name


def test_encode_labels_only_completion(tiny_base: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    example = Example(prompt=[{"role": "user", "content": "What is two plus two?"}], completion="four")
    encoded = encode_example(tokenizer, example, max_length=200)
    scored = [token for token, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(scored) == "four<|im_end|>"
    assert render_completion(tokenizer, example) == "four<|im_end|>"
    assert encoded.labels[0] == IGNORE_INDEX


def test_encode_truncates_completion_end(tiny_base: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    example = Example(prompt=[{"role": "user", "content": "hi"}], completion="The quick brown fox jumps over the lazy dog.")
    full = encode_example(tokenizer, example, max_length=500)
    short = encode_example(tokenizer, example, max_length=len(full.input_ids) - 3)
    assert short.input_ids == full.input_ids[:-3]
    assert short.completion_tokens == full.completion_tokens - 3


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("Positive.", "positive"), ("The sentiment is neutral", "neutral"), ("not negative but positive", "negative"), ("unsure", None)],
)
def test_extract_label(reply: str, expected: str | None):
    assert extract_label(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("-65", "-65"), ("6 - 1 + 2 = 7", "7"), ("The answer is 1,204.", "1204"), ("none", None), ("007", "7")],
)
def test_extract_integer(reply: str, expected: str | None):
    assert extract_integer(reply) == expected


@pytest.mark.slow
def test_prepare_data_is_deterministic(tmp_path: Path):
    first = prepare_data(tmp_path / "a", scale=0.05)
    second = prepare_data(tmp_path / "b", scale=0.05)
    assert first == second
    for name in TASKS:
        for split in SPLITS:
            a = (tmp_path / "a" / name / f"{split}.jsonl").read_bytes()
            assert a == (tmp_path / "b" / name / f"{split}.jsonl").read_bytes()
            assert a


@pytest.mark.slow
def test_prepare_data_reproduces_committed_files(tmp_path: Path):
    manifest = prepare_data(tmp_path)
    committed = json.loads((DATA / "manifest.json").read_text())
    for name in TASKS:
        assert manifest["tasks"][name]["splits"] == committed["tasks"][name]["splits"]
