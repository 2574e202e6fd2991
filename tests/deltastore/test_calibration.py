"""Calibration and validation files, token windows and input feature norms."""

from __future__ import annotations

import json

import pytest
import torch

from deltastore.calibration import (
    CalibrationError,
    ValidationSample,
    collect_input_norms,
    read_calibration,
    read_validation,
    token_windows,
)
from tests.tinymodel import build_tokenizer


def test_plain_text_one_sample_per_line(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text("first sample\n\n  \nsecond sample\n")
    assert read_calibration(path) == ["first sample", "second sample"]


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "calibration.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b", "id": 2}) + "\n")
    assert read_calibration(path) == ["a", "b"]


def test_missing_calibration_file(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        read_calibration(tmp_path / "absent.txt")


def test_empty_calibration_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    with pytest.raises(CalibrationError, match="empty.txt.*is empty"):
        read_calibration(path)


def test_invalid_jsonl_line_named(tmp_path):
    path = tmp_path / "calibration.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(CalibrationError, match="calibration.jsonl'?, line 2: invalid JSON"):
        read_calibration(path)


def test_jsonl_without_text_field(tmp_path):
    path = tmp_path / "calibration.jsonl"
    path.write_text(json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(CalibrationError, match="line 1: field 'text'"):
        read_calibration(path)


def test_validation_samples_read(tmp_path):
    path = tmp_path / "validation.jsonl"
    lines = [
        {"prompt": "2+2=", "completion": " 4", "answer": "4"},
        {"prompt": "Sky colour:", "completion": " blue"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert read_validation(path) == [
        ValidationSample(prompt="2+2=", completion=" 4", answer="4"),
        ValidationSample(prompt="Sky colour:", completion=" blue", answer=None),
    ]


def test_validation_missing_completion(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(CalibrationError, match="line 2: field 'completion'"):
        read_validation(path)


def test_validation_line_not_object(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(CalibrationError, match="line 1: expected a JSON object"):
        read_validation(path)


def test_empty_validation_file(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text("")
    with pytest.raises(CalibrationError, match="is empty"):
        read_validation(path)


def test_missing_validation_file(tmp_path):
    with pytest.raises(CalibrationError, match="validation file .* does not exist"):
        read_validation(tmp_path / "absent.jsonl")


def test_token_windows_split_long_samples():
    tokenizer = build_tokenizer()
    text = "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 " * 3
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = token_windows(tokenizer, [text], window_tokens=7, max_windows=100)
    assert all(window.shape[0] == 1 for window in windows)
    assert all(2 <= window.shape[1] <= 7 for window in windows)
    assert sum(window.shape[1] for window in windows) >= count - 1


def test_token_windows_respect_max_windows():
    tokenizer = build_tokenizer()
    windows = token_windows(tokenizer, ["The quick brown fox jumps over the lazy dog."] * 10, window_tokens=4, max_windows=3)
    assert len(windows) == 3


class TwoLayers(torch.nn.Module):
    """An embedding and two linear layers with odd sizes, called like a causal LM."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.first = torch.nn.Linear(5, 7)
        self.second = torch.nn.Linear(7, 3)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return self.second(torch.relu(self.first(self.embed(input_ids))))


def test_input_norms_match_manual_computation():
    torch.manual_seed(0)
    model = TwoLayers()
    windows = [torch.tensor([[1, 4, 9]]), torch.tensor([[2, 3]])]
    norms = collect_input_norms(model, windows)
    assert set(norms) == {"first.weight", "second.weight"}

    with torch.no_grad():
        inputs = torch.cat([model.embed(window)[0] for window in windows])  # (5, 5)
        expected_first = inputs.pow(2).sum(0).sqrt()
        expected_second = torch.relu(model.first(inputs)).pow(2).sum(0).sqrt()
    torch.testing.assert_close(norms["first.weight"], expected_first)
    torch.testing.assert_close(norms["second.weight"], expected_second)
    assert norms["second.weight"].shape == (7,)


def test_input_norm_hooks_removed():
    model = TwoLayers()
    collect_input_norms(model, [torch.tensor([[1, 2]])])
    assert not model.first._forward_hooks
    assert not model.second._forward_hooks


def test_validation_accepts_chat_messages(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "2 + 2?"}], "completion": "4", "answer": "4"}) + "\n")

    (sample,) = read_validation(path)

    assert sample.prompt == ({"role": "user", "content": "2 + 2?"},)
    assert sample.answer == "4"


@pytest.mark.parametrize("prompt", [[], [{"role": "user"}], [{"role": 1, "content": "x"}], ["text"]])
def test_validation_rejects_bad_messages(tmp_path, prompt):
    path = tmp_path / "validation.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "completion": "4"}) + "\n")

    with pytest.raises(CalibrationError, match="line 1: a list 'prompt' must hold chat messages"):
        read_validation(path)
