"""Batched generation against plain transformers `generate` on the tiny model (float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.generation import FINISH_LENGTH, FINISH_STOP, SamplingParams, SequenceInput, generate
from tests.server.support import greedy_text, tokenizer_for

PROMPTS = [
    "The quick brown fox",
    "What is two plus two?",
    "I",
    "Sparse deltas are applied in place and restored exactly.",
    "Terrible service",
]
EOS = frozenset({2})


@pytest.fixture(scope="module")
def model(tiny_base: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(tiny_base: Path):
    return tokenizer_for(tiny_base)


def pick_stop(text: str, *, start: int, size: int) -> str:
    """Return the first substring of `text` at or after `start` with no replacement character."""
    for i in range(start, len(text) - size + 1):
        if "\ufffd" not in text[i : i + size]:
            return text[i : i + size]
    raise AssertionError(f"no clean {size}-character substring in {text!r}")


def _run(model, tok, prompts: list[str], params: list[SamplingParams], **kwargs):
    sequences = [SequenceInput(tok(p)["input_ids"], sp, **kwargs) for p, sp in zip(prompts, params, strict=True)]
    return generate(model, tok, sequences, eos_token_ids=EOS, pad_token_id=0)


def test_greedy_batch_matches_transformers_generate(model, tok) -> None:
    max_tokens = [17, 5, 23, 9, 13]
    results = _run(model, tok, PROMPTS, [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens])
    for prompt, m, result in zip(PROMPTS, max_tokens, results, strict=True):
        text, count = greedy_text(model, tok, tok(prompt)["input_ids"], max_tokens=m)
        assert result.text == text, prompt
        assert result.completion_tokens == count, prompt


def test_greedy_alone_equals_batched(model, tok) -> None:
    params = [SamplingParams(max_tokens=19, temperature=0.0)] * len(PROMPTS)
    batched = _run(model, tok, PROMPTS, params)
    for prompt, together in zip(PROMPTS, batched, strict=True):
        (alone,) = _run(model, tok, [prompt], params[:1])
        assert alone.token_ids == together.token_ids, prompt


def test_max_tokens_respected(model, tok) -> None:
    (result,) = _run(model, tok, ["I"], [SamplingParams(max_tokens=3, temperature=0.0)])
    assert result.completion_tokens == 3
    assert result.finish_reason == FINISH_LENGTH
    assert result.prompt_tokens == len(tok("I")["input_ids"])


def test_stop_sequence_trims_output(model, tok) -> None:
    (full,) = _run(model, tok, [PROMPTS[0]], [SamplingParams(max_tokens=20, temperature=0.0)])
    stop = pick_stop(full.text, start=4, size=2)
    (cut,) = _run(model, tok, [PROMPTS[0]], [SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,))])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == FINISH_STOP
    assert stop not in cut.text


def test_streamed_pieces_concatenate_to_text(model, tok) -> None:
    pieces: list[str] = []
    params = SamplingParams(max_tokens=21, temperature=0.7, top_p=0.9, seed=5)
    sequence = SequenceInput(tok(PROMPTS[1])["input_ids"], params, on_text=pieces.append)
    (result,) = generate(model, tok, [sequence], eos_token_ids=EOS, pad_token_id=0)
    assert len(pieces) == result.completion_tokens  # one call per token, possibly with ""
    assert "".join(pieces) == result.text


def test_streamed_pieces_never_contain_stop(model, tok) -> None:
    (full,) = _run(model, tok, [PROMPTS[3]], [SamplingParams(max_tokens=20, temperature=0.0)])
    stop = pick_stop(full.text, start=6, size=3)
    pieces: list[str] = []
    params = SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,))
    sequence = SequenceInput(tok(PROMPTS[3])["input_ids"], params, on_text=pieces.append)
    (result,) = generate(model, tok, [sequence], eos_token_ids=EOS, pad_token_id=0)
    assert "".join(pieces) == result.text == full.text[: full.text.find(stop)]


def test_seed_reproducible_across_batches(model, tok) -> None:
    sampled = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, seed=1234)
    (alone,) = _run(model, tok, [PROMPTS[0]], [sampled])
    together = _run(model, tok, [PROMPTS[2], PROMPTS[0]], [SamplingParams(max_tokens=7, seed=9), sampled])
    assert together[1].token_ids == alone.token_ids


def test_different_seeds_differ(model, tok) -> None:
    outputs = {
        tuple(_run(model, tok, [PROMPTS[0]], [SamplingParams(max_tokens=15, temperature=1.0, seed=s)])[0].token_ids)
        for s in range(4)
    }
    assert len(outputs) > 1


def test_tiny_top_p_is_greedy(model, tok) -> None:
    (greedy,) = _run(model, tok, [PROMPTS[4]], [SamplingParams(max_tokens=11, temperature=0.0)])
    (nucleus,) = _run(model, tok, [PROMPTS[4]], [SamplingParams(max_tokens=11, temperature=1.0, top_p=1e-6, seed=3)])
    assert nucleus.token_ids == greedy.token_ids


def test_end_token_finishes_with_stop(model, tok) -> None:
    # Make the end token the greedy choice at every step by taking the argmax of the first step as EOS.
    ids = tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        first = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    (result,) = generate(
        model, tok, [SequenceInput(ids, SamplingParams(max_tokens=9, temperature=0.0))],
        eos_token_ids=frozenset({first}), pad_token_id=0,
    )
    assert result.finish_reason == FINISH_STOP
    assert result.completion_tokens == 1
    assert result.text == ""


def test_cancelled_sequence_leaves_batch(model, tok) -> None:
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    sequences = [
        SequenceInput(tok(PROMPTS[0])["input_ids"], SamplingParams(max_tokens=12, temperature=0.0), is_cancelled=cancelled),
        SequenceInput(tok(PROMPTS[1])["input_ids"], SamplingParams(max_tokens=12, temperature=0.0)),
    ]
    results = generate(model, tok, sequences, eos_token_ids=EOS, pad_token_id=0)
    (alone,) = _run(model, tok, [PROMPTS[1]], [SamplingParams(max_tokens=12, temperature=0.0)])
    assert results[0].finish_reason == "cancelled"
    assert results[0].completion_tokens == 2
    assert results[1].token_ids == alone.token_ids


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": 0}, {"max_tokens": 4, "temperature": -0.1}, {"max_tokens": 4, "top_p": 0.0}, {"max_tokens": 4, "stop": ("",)}],
)
def test_sampling_params_reject_invalid(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_empty_prompt_rejected(model, tok) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tok, [SequenceInput([], SamplingParams(max_tokens=3))], eos_token_ids=EOS, pad_token_id=0)


def test_ignore_eos_runs_to_max_tokens(model, tok) -> None:
    ids = tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        first = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    (result,) = generate(model, tok, [SequenceInput(ids, params)], eos_token_ids=frozenset({first}), pad_token_id=0)
    assert result.completion_tokens == 9
    assert result.finish_reason == FINISH_LENGTH
