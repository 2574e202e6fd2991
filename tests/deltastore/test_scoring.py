"""Exact-match rules and output change."""

from __future__ import annotations

import pytest
import torch

from deltastore.calibration import ValidationSample
from deltastore.scoring import (
    ReferenceLogits,
    extract_answer,
    is_correct,
    load_causal_lm,
    output_change,
    reference_logits,
    score_model,
)


def test_answer_after_marker():
    assert extract_answer("3 + 4 = 7 apples\n#### 7\nmore text") == "7"


def test_answer_first_nonblank_line():
    assert extract_answer("\n  positive \nnegative") == "positive"


def test_answer_of_empty_generation():
    assert extract_answer("   ") == ""


def test_answer_sample_compares_answer_only():
    sample = ValidationSample(prompt="p", completion=" long reasoning #### 12", answer="12")
    assert is_correct(sample, "other reasoning #### 12")
    assert not is_correct(sample, "#### 13")


def test_completion_sample_needs_word_boundary():
    sample = ValidationSample(prompt="p", completion=" blue")
    assert is_correct(sample, " blue")
    assert is_correct(sample, " blue. The sky")
    assert not is_correct(sample, " blueberry")
    assert not is_correct(sample, " green")


def test_model_scores_its_own_greedy_output(tiny_base):
    model, tokenizer = load_causal_lm(tiny_base)
    prompt = "The quick brown fox"
    ids = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    continuation = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    # The model's own greedy continuation scores 1; an answer it cannot produce scores 0.
    own = ValidationSample(prompt=prompt, completion=continuation)
    foreign = ValidationSample(prompt=prompt, completion="zzzz never", answer="never-an-answer")
    result = score_model(model, tokenizer, [own, foreign], max_new_tokens=6)
    assert result.total == 2
    assert result.correct == 1
    assert result.accuracy == pytest.approx(0.5)


def test_output_change_zero_for_same_model(tiny_base):
    model, _ = load_causal_lm(tiny_base)
    windows = [torch.tensor([[5, 9, 17, 33, 2]]), torch.tensor([[7, 8, 9]])]
    reference = reference_logits(model, windows)
    assert reference.indices[0].shape == (5, 5)
    assert output_change(model, reference) == 0.0


def test_output_change_is_mean_squared_error(tiny_base):
    model, _ = load_causal_lm(tiny_base)
    window = torch.tensor([[5, 9, 17]])
    with torch.no_grad():
        logits = model(input_ids=window).logits[0]
    top = torch.topk(logits, 5, dim=-1)
    shifted = ReferenceLogits(windows=[window], indices=[top.indices], values=[top.values + 0.5])
    assert output_change(model, shifted) == pytest.approx(0.25)


def test_chat_message_prompt_uses_template(tiny_base):
    model, tokenizer = load_causal_lm(tiny_base)
    messages = ({"role": "user", "content": "What is two plus two?"},)
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    continuation = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    result = score_model(model, tokenizer, [ValidationSample(prompt=messages, completion=continuation)], max_new_tokens=6)

    assert result.correct == 1
