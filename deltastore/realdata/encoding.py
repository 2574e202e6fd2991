"""Turning task examples into token ids with the model's chat template.

Prompt and completion are rendered separately and concatenated, so the boundary between the
tokens that are conditioned on and the tokens that are scored or trained on is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from deltastore.realdata.tasks import Example, load_examples

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example; `labels` is IGNORE_INDEX on prompt tokens."""

    input_ids: list[int]
    labels: list[int]

    @property
    def completion_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render_prompt(tokenizer, prompt: list[dict[str, str]]) -> str:  # noqa: ANN001 - any HF tokenizer
    """Render chat messages with the tokenizer's template, ending where the assistant reply starts."""
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; the task prompts need one")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def render_completion(tokenizer, example: Example) -> str:  # noqa: ANN001
    """Return the text the template puts after the prompt for the reference reply, up to its end token."""
    prompt_text = render_prompt(tokenizer, example.prompt)
    full = tokenizer.apply_chat_template(
        [*example.prompt, {"role": "assistant", "content": example.completion}], tokenize=False
    )
    if not full.startswith(prompt_text):
        raise ValueError(
            f"the chat template of {tokenizer.name_or_path!r} renders the prompt differently with and without "
            "an assistant turn, so the completion tokens cannot be separated"
        )
    completion = full[len(prompt_text) :]
    # Stop at the end-of-turn token: what follows it (a newline) is never generated.
    eos = tokenizer.eos_token
    if eos and eos in completion:
        completion = completion[: completion.index(eos) + len(eos)]
    return completion


def encode_example(tokenizer, example: Example, *, max_length: int) -> EncodedExample:  # noqa: ANN001
    """Tokenize one example, cutting the end of the completion to fit `max_length` tokens."""
    prompt_ids = tokenizer(render_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(render_completion(tokenizer, example), add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return EncodedExample(input_ids=input_ids, labels=labels)


def collate(batch: list[EncodedExample], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into `input_ids`, `attention_mask` and `labels`, each (B, T)."""
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item.input_ids)
        input_ids[row, :length] = torch.tensor(item.input_ids)
        labels[row, :length] = torch.tensor(item.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def render_file(tokenizer, source: Path, out: Path) -> int:  # noqa: ANN001
    """Write `source` with each prompt rendered to text by the tokenizer's chat template; return the count.

    Tools that take plain-text prompts (the compression pipeline's validation and calibration
    files) read the result: `prompt` becomes the rendered string ending with the assistant header,
    and `completion` and `answer` are copied unchanged.
    """
    examples = load_examples(source)
    lines = []
    for example in examples:
        record = {"prompt": render_prompt(tokenizer, example.prompt), "completion": example.completion}
        if example.answer is not None:
            record["answer"] = example.answer
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")
    return len(lines)
