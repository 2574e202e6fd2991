"""Prompt files of a load test: plain text (one prompt per line) or JSONL.

A file is read as JSONL when its first non-blank line starts with `{`. Each JSONL object has a
`prompt` string (sent to /v1/completions) or a `messages` list of `{"role", "content"}` objects
(sent to /v1/chat/completions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt file that is missing, empty or malformed."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: completion text, or chat messages."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def load_prompts(path: Path) -> list[Prompt]:
    """Read every prompt of `path`; raise PromptFileError with the line number on a bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise PromptFileError(f"prompt file {str(path)!r} not found; pass a text or JSONL file to --prompts") from e
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read prompt file {str(path)!r}: {e}") from e

    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise PromptFileError(f"prompt file {str(path)!r} is empty; write one prompt per line")
    if lines[0][1].lstrip().startswith("{"):
        return [_json_prompt(path, number, line) for number, line in lines]
    return [Prompt(text=line) for _, line in lines]


def _json_prompt(path: Path, number: int, line: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}:{number}: invalid JSON ({e.msg}); write one JSON object per line") from e
    if not isinstance(record, dict):
        raise PromptFileError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return Prompt(text=record["prompt"])
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(_is_message(m) for m in messages):
        return Prompt(messages=tuple({"role": m["role"], "content": m["content"]} for m in messages))
    raise PromptFileError(
        f"{path}:{number}: expected a non-empty 'prompt' string or a 'messages' list of "
        f"{{'role': ..., 'content': ...}} objects, got keys {sorted(record)!r}"
    )


def _is_message(message: object) -> bool:
    return isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
