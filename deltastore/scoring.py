"""Measure a causal language model: exact match on labelled samples, and output change.

Exact match: greedy generation for each validation sample. A sample with an `answer` is correct when the answer extracted from the generation equals it: the
text after the last `####` marker (the GSM8K convention) if there is one, else the first non-blank
line. A sample without `answer` is correct when the stripped generation starts with the stripped
expected completion and the next character, if any, is not a letter or digit.

Output change: the mean squared error between a model's logits and a reference model's logits,
taken at the reference's top-5 tokens of every position of the calibration windows (the
unlabelled proxy that DAREx-q uses to choose q for decoder models).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deltastore.calibration import ValidationSample

logger = logging.getLogger(__name__)

ANSWER_MARKER = "####"
DEFAULT_MAX_NEW_TOKENS = 64
TOP_LOGITS = 5
# Tokens generated beyond the expected completion's length, because tokenizing the completion
# alone and after the prompt can split it into slightly different tokens.
_EXTRA_TOKENS = 4


@dataclass(frozen=True)
class ScoreResult:
    """Exact-match accuracy on a labelled file."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def extract_answer(generation: str) -> str:
    """Return the answer part of a generation: after the last `####`, else its first non-blank line."""
    if ANSWER_MARKER in generation:
        return generation.rsplit(ANSWER_MARKER, 1)[1].strip().split("\n", 1)[0].strip()
    for line in generation.splitlines():
        if line.strip():
            return line.strip()
    return ""


def is_correct(sample: ValidationSample, generation: str) -> bool:
    """Return whether `generation` matches the sample's answer, or else its expected completion."""
    if sample.answer is not None:
        return extract_answer(generation) == sample.answer.strip()
    expected = sample.completion.strip()
    produced = generation.strip()
    if not produced.startswith(expected):
        return False
    rest = produced[len(expected) :]
    return not rest or not rest[0].isalnum()


@torch.no_grad()
def generate_greedy(model: torch.nn.Module, tokenizer, prompt: str | Sequence[dict], *, max_new_tokens: int) -> str:
    """Return the greedy continuation of `prompt` (without the prompt), stopping at end of sequence.

    A prompt of chat messages is rendered with the tokenizer's chat template, which already
    holds the special tokens.
    """
    device = next(model.parameters()).device
    if isinstance(prompt, str):
        encoded = tokenizer(prompt, return_tensors="pt")
    else:
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    input_ids = encoded["input_ids"].to(device)  # (1, prompt tokens)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=encoded["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def score_model(
    model: torch.nn.Module,
    tokenizer,
    samples: list[ValidationSample],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> ScoreResult:
    """Generate greedily for every sample and count exact matches.

    Each sample gets as many new tokens as its expected completion has, plus a few, at most
    `max_new_tokens`.
    """
    if not samples:
        raise ValueError("score_model needs at least one validation sample")
    model.eval()
    correct = 0
    for sample in samples:
        budget = len(tokenizer(sample.completion, add_special_tokens=False)["input_ids"]) + _EXTRA_TOKENS
        generation = generate_greedy(model, tokenizer, sample.prompt, max_new_tokens=min(budget, max_new_tokens))
        correct += is_correct(sample, generation)
    result = ScoreResult(correct=correct, total=len(samples))
    logger.debug("scored %d/%d samples correct", result.correct, result.total)
    return result


def load_causal_lm(folder: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a causal language model and its tokenizer from a local folder, in eval mode.

    float32 by default, so a measured output change comes from the delta and not from
    half-precision rounding of the base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.to(device).eval()
    return model, tokenizer


@dataclass(frozen=True)
class ReferenceLogits:
    """A reference model's top-k tokens and logits for every position of each calibration window."""

    windows: list[torch.Tensor]  # each (1, T) token ids
    indices: list[torch.Tensor]  # each (T, k) int64 token ids
    values: list[torch.Tensor]  # each (T, k) float32 logits


@torch.no_grad()
def reference_logits(model: torch.nn.Module, windows: list[torch.Tensor], *, top: int = TOP_LOGITS) -> ReferenceLogits:
    """Record `model`'s top-`top` logits at every position of every window."""
    device = next(model.parameters()).device
    indices, values = [], []
    for window in windows:
        logits = model(input_ids=window.to(device), use_cache=False).logits[0].float()  # (T, vocab)
        top_values, top_indices = torch.topk(logits, min(top, logits.shape[-1]), dim=-1)
        indices.append(top_indices.cpu())
        values.append(top_values.cpu())
    return ReferenceLogits(windows=windows, indices=indices, values=values)


@torch.no_grad()
def output_change(model: torch.nn.Module, reference: ReferenceLogits) -> float:
    """Return the mean squared error of `model`'s logits at the reference's top tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for window, top_indices, top_values in zip(reference.windows, reference.indices, reference.values):
        logits = model(input_ids=window.to(device), use_cache=False).logits[0].float()  # (T, vocab)
        picked = logits.gather(-1, top_indices.to(device)).cpu()  # (T, k)
        # Sum in float64, so many windows do not lose the low bits of small errors.
        total += float((picked.double() - top_values.double()).pow(2).sum())
        count += top_values.numel()
    return total / count
