"""Scoring any HF model folder on a task split, deterministically.

- `accuracy` (sentiment): greedy decoding; the prediction is the earliest label word in the reply.
- `exact_match` (arithmetic): greedy decoding, and the prediction is the last integer in the reply.
  A base model that replies "The result is 7." is therefore not penalised for its phrasing.
- `nll` (instruct): teacher-forced mean negative log-likelihood per reference-response token
  (natural log, token-weighted over the split; lower is better). No sampling, no judge model.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from deltastore.realdata.encoding import IGNORE_INDEX, collate, encode_example, render_prompt
from deltastore.realdata.tasks import SENTIMENT_LABELS, Example, get_task, load_examples

logger = logging.getLogger(__name__)

_LABEL_PATTERN = re.compile(r"\b(" + "|".join(SENTIMENT_LABELS) + r")\b")
_INTEGER_PATTERN = re.compile(r"-?\d+")


def extract_label(reply: str) -> str | None:
    match = _LABEL_PATTERN.search(reply.lower())
    return match.group(1) if match else None


def extract_integer(reply: str) -> str | None:
    found = _INTEGER_PATTERN.findall(reply.replace(",", ""))
    return str(int(found[-1])) if found else None


@dataclass(frozen=True)
class Metric:
    """Scoring rule of one metric; `extract` is None for likelihood metrics."""

    name: str
    higher_is_better: bool
    extract: Callable[[str], str | None] | None = None
    max_new_tokens: int = 0


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(name="accuracy", higher_is_better=True, extract=extract_label, max_new_tokens=12),
        Metric(name="exact_match", higher_is_better=True, extract=extract_integer, max_new_tokens=16),
        Metric(name="nll", higher_is_better=False),
    )
}


@dataclass(frozen=True)
class ScoreResult:
    """One model's score on one task split."""

    model: str
    task: str
    split: str
    metric: str
    value: float
    examples: int
    higher_is_better: bool


def score_task(
    model_dir: str | Path,
    task: str,
    *,
    split: str = "test",
    data_dir: Path = Path("data"),
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int = 512,
) -> ScoreResult:
    """Load `model_dir` (float32, CPU or the first CUDA device) and score it on a task split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = get_task(task)
    metric = METRICS[spec.metric]
    examples = load_examples(Path(data_dir) / task / f"{split}.jsonl")
    if limit is not None:
        examples = examples[:limit]
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} has no config.json; pass a Hugging Face model folder")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # float32: scores must not depend on the hardware's half-precision kernels.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).to(device).eval()

    if metric.extract is None:
        value = mean_nll(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    else:
        replies = generate_replies(model, tokenizer, examples, max_new_tokens=metric.max_new_tokens, batch_size=batch_size)
        hits = [metric.extract(reply) == example.answer for reply, example in zip(replies, examples, strict=True)]
        value = sum(hits) / len(hits)
    result = ScoreResult(
        model=str(model_dir), task=task, split=split, metric=metric.name, value=value,
        examples=len(examples), higher_is_better=metric.higher_is_better,
    )
    logger.info("%s on %s/%s: %s = %.4f (%d examples)", model_dir, task, split, metric.name, value, len(examples))
    return result


@torch.no_grad()
def generate_replies(model, tokenizer, examples: list[Example], *, max_new_tokens: int, batch_size: int) -> list[str]:  # noqa: ANN001
    """Greedy-decode a reply to every prompt, in batches with left padding."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [tokenizer(render_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"] for ex in batch]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # (B, width + new)
        replies.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    return replies


@torch.no_grad()
def mean_nll(model, tokenizer, examples: list[Example], *, batch_size: int, max_length: int) -> float:  # noqa: ANN001
    """Return the token-weighted mean NLL (nats) of the reference completions."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_example(tokenizer, ex, max_length=max_length) for ex in examples]
    encoded = [item for item in encoded if item.completion_tokens > 0]
    if not encoded:
        raise ValueError(f"no example keeps a completion token within max_length={max_length}; raise max_length")
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size], pad_token_id=pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, vocab)
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total_nll += nll.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    value = total_nll / total_tokens
    if not math.isfinite(value):
        raise ValueError(f"the mean NLL is {value}; the model produces non-finite logits")
    return value
