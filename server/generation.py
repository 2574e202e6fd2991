"""Batched sampling with the KV cache for requests that share one set of weights.

The contract: `generate` takes prompt token ids and sampling settings, runs the model on
whatever weights it has right now, and returns text with usage counts. It never touches the
weights, so the caller (the engine loop) decides which task they belong to. Prompts of different
lengths are left-padded, with an attention mask and per-row position ids, so a row's tokens see
the same positions and keys as when the row runs alone. Finished rows leave the batch (and the KV
cache) at once.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# finish_reason values as OpenAI sends them, plus one the server never sends to a client.
FINISH_STOP = "stop"  # an end-of-sequence token or a stop sequence
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_CANCELLED = "cancelled"  # the client went away; the result is dropped


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one sequence; temperature 0 means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens (for benchmarks)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not stop for stop in self.stop):
            raise ValueError(f"stop sequences must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SequenceInput:
    """One prompt to complete.

    `on_text` is called once per generated token with the output text that became final with it,
    which may be "" (a partial character or a possible stop-sequence prefix is held back).
    """

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None
    is_cancelled: Callable[[], bool] | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _TextTracker:
    """Turn generated ids into final text: cut at stop sequences and hold back what is not final yet.

    Text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or in a
    prefix of a stop sequence, so streamed pieces never contain text that a stop later removes.
    """

    tokenizer: PreTrainedTokenizerBase
    stops: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return the newly final text and whether a stop sequence was found."""
        self.ids.append(token_id)
        # NOTE: decoding all ids each step costs O(n^2) in the output length, which is cheap for a few
        # hundred tokens. It keeps the text equal to one decode of the whole output for every
        # tokenizer. Outputs of many thousands of tokens would need a windowed decode.
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)

        # 1. A stop sequence ends the output just before it; the stop itself is never returned.
        cut = min((i for i in (self.text.find(stop) for stop in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._take(len(self.text)), True

        # 2. Otherwise hand out everything but a partial character or a possible stop prefix.
        final = len(self.text)
        while final > self.emitted and self.text[final - 1] == "\ufffd":
            final -= 1
        for stop in self.stops:
            for size in range(min(len(stop) - 1, final - self.emitted), 0, -1):
                if self.text[final - size : final] == stop[:size]:
                    final -= size
                    break
        return self._take(final), False

    def flush(self) -> str:
        """Return all text not yet handed out (the sequence has ended without a stop)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece


def _make_generator(seed: int | None) -> torch.Generator:
    # Sampling draws on CPU, so a seeded request samples the same tokens on every device.
    return torch.Generator(device="cpu").manual_seed(seed if seed is not None else secrets.randbits(63))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches `top_p`."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0  # the most likely token always stays (mass_before 0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Sample one token id from one row of float32 logits (vocab,) on the CPU."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    probs = _top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """Pick the next token of every row of `logits` (rows, vocab)."""
    greedy = logits.argmax(dim=-1).tolist()
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy
    # Softmax in float32 on CPU: the per-request generators are CPU generators.
    cpu_logits = logits[sampled_rows].float().cpu()
    for i, row in enumerate(sampled_rows):
        greedy[row] = _sample_row(cpu_logits[i], params[row], generators[row])
    return greedy


def _left_pad(prompts: Sequence[list[int]], *, pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Return input ids, attention mask and position ids (each rows x longest prompt)."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    # Positions count real tokens only, so a padded row gets the positions it would get alone.
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sequences: Sequence[SequenceInput],
    *,
    eos_token_ids: frozenset[int],
    pad_token_id: int,
    on_rows: Callable[[list[int]], None] | None = None,
) -> list[Completion]:
    """Complete every sequence with the model's current weights; results keep the input order.

    `on_rows`, when given, receives the sequence index of every batch row before the first forward
    pass and again whenever finished rows leave the batch (mixed batches route rows by it).
    """
    if not sequences:
        return []
    if any(not seq.prompt_ids for seq in sequences):
        raise ValueError("every prompt needs at least one token; an empty prompt has nothing to condition on")
    device = next(model.parameters()).device

    # 1. Per-sequence state. `active` maps batch rows to sequence indices and shrinks as rows finish.
    trackers = [_TextTracker(tokenizer, seq.params.stop) for seq in sequences]
    generators = [_make_generator(seq.params.seed) for seq in sequences]
    finish: list[str | None] = [None] * len(sequences)
    active = list(range(len(sequences)))

    # 2. Prefill all prompts at once; only the last position's logits are needed.
    input_ids, mask, positions = _left_pad([s.prompt_ids for s in sequences], pad_token_id=pad_token_id, device=device)
    cache = DynamicCache(config=model.config)
    if on_rows is not None:
        on_rows(list(active))
    out = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    )
    logits = out.logits[:, -1, :]  # (rows, vocab)
    positions = positions[:, -1:]  # (rows, 1)

    while True:
        # 3. Pick a token per active row and feed it to that row's text tracker.
        tokens = _next_tokens(logits, [sequences[i].params for i in active], [generators[i] for i in active])
        for row, index in enumerate(active):
            seq = sequences[index]
            token = tokens[row]
            if seq.is_cancelled is not None and seq.is_cancelled():
                finish[index] = FINISH_CANCELLED
                continue
            if token in eos_token_ids and not seq.params.ignore_eos:
                trackers[index].ids.append(token)
                finish[index] = FINISH_STOP
                piece = trackers[index].flush()
            else:
                piece, stopped = trackers[index].push(token)
                if stopped:
                    finish[index] = FINISH_STOP
                elif len(trackers[index].ids) >= seq.params.max_tokens:
                    finish[index] = FINISH_LENGTH
                    piece += trackers[index].flush()
            if seq.on_text is not None:
                seq.on_text(piece)

        # 4. Drop finished rows from the batch and the KV cache; stop when none are left.
        keep = [row for row, index in enumerate(active) if finish[index] is None]
        if not keep:
            break
        if len(keep) < len(active):
            keep_index = torch.tensor(keep, device=device)
            cache.batch_select_indices(keep_index)
            mask = mask[keep_index]
            positions = positions[keep_index]
            active = [active[row] for row in keep]
            tokens = [tokens[row] for row in keep]
            if on_rows is not None:
                on_rows(list(active))

        # 5. One decode step for the remaining rows.
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
        positions = positions + 1
        step_ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(-1)  # (rows, 1)
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        logits = out.logits[:, -1, :]

    return [
        Completion(
            text=tracker.text,
            token_ids=list(tracker.ids),
            finish_reason=reason or FINISH_CANCELLED,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(tracker.ids),
        )
        for seq, tracker, reason in zip(sequences, trackers, finish, strict=True)
    ]
