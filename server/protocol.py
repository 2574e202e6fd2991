"""OpenAI-compatible request and response bodies, and the OpenAI error shape.

Field names and meanings follow the OpenAI completions and chat completions APIs. Sampling fields
reject NaN and Infinity (which Python's JSON parser accepts as bare words) with a 400.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4  # the limit OpenAI documents for `stop`
MAX_CHOICES = 16  # prompts times n in one request; each choice is its own engine request

# Codes of the validators' errors (PydanticCustomError types); server/errors.py sends them as `code`.
UNSUPPORTED_PARAMETER = "unsupported_parameter"
INVALID_VALUE = "invalid_value"
TOO_MANY_CHOICES = "too_many_choices"
CUSTOM_ERROR_CODES = frozenset({UNSUPPORTED_PARAMETER, INVALID_VALUE, TOO_MANY_CHOICES})


MAX_SHOWN_CHARS = 60  # longer values are cut in error messages, with their full length given


def shorten_value(value: Any) -> str:
    """Render a value as the client sent it (JSON, or repr where JSON cannot show it), cut to MAX_SHOWN_CHARS."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return f"{text[:MAX_SHOWN_CHARS]}... ({len(text)} characters)"


class _Strict(BaseModel):
    # Unknown fields (user, metadata, ...) are ignored, because OpenAI clients send fields this server
    # has no use for; unsupported sampling options are rejected below. Types are strict: "5" or 2.0
    # for an integer, 1 for a boolean or true for a number is a 400, never silently converted.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


# OpenAI fields the server does not implement, with the values that ask for nothing. Any other
# value is rejected with a 400, because ignoring it would return results the client did not ask for.
# The error message offers null and the last value of each tuple.
_UNSUPPORTED_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, 0, False),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0.0, 0),
    "frequency_penalty": (None, 0.0, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    # seed + choice index seeds torch.Generator, which takes a signed or unsigned 64-bit value.
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="Not in OpenAI's API (vLLM has it): generate max_tokens tokens.")
    logprobs: Any = None
    top_logprobs: Any = None
    suffix: Any = None
    best_of: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None

    @field_validator(*_UNSUPPORTED_NEUTRAL, mode="before")
    @classmethod
    def _reject_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if not any(value == neutral and type(value) is type(neutral) for neutral in _UNSUPPORTED_NEUTRAL[info.field_name]):
            raise PydanticCustomError(
                UNSUPPORTED_PARAMETER,
                "{field} is not supported by this server, got {value}; leave it out of the request or send null "
                "or {neutral}",
                {"field": info.field_name, "value": shorten_value(value), "neutral": shorten_value(_UNSUPPORTED_NEUTRAL[info.field_name][-1])},
            )
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise PydanticCustomError(
                INVALID_VALUE, "stop has {count} sequences; send at most {limit}",
                {"count": len(stops), "limit": MAX_STOP_SEQUENCES},
            )
        if any(stop == "" for stop in stops):
            raise PydanticCustomError(
                INVALID_VALUE, "stop contains an empty string, got {value}; every stop sequence needs a character",
                {"value": shorten_value(value)},
            )
        return stops

    def stop_list(self) -> list[str]:
        # The validator has already turned `stop` into a list.
        return list(self.stop or [])


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="One prompt or a list of prompts; each gets n choices.")
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise PydanticCustomError(INVALID_VALUE, "prompt is an empty list; send a string or a list of at least one string")
        return value

    @model_validator(mode="after")
    def _check_choices(self) -> CompletionRequest:
        choices = len(self.prompts()) * self.n
        if choices > MAX_CHOICES:
            prompts = len(self.prompts())
            raise PydanticCustomError(
                TOO_MANY_CHOICES,
                "{prompts} {prompt_word} times n={n} asks for {choices} choices; the limit is {limit}, "
                "so lower n or send fewer prompts",
                {"prompts": prompts, "prompt_word": "prompt" if prompts == 1 else "prompts", "n": self.n,
                 "choices": choices, "limit": MAX_CHOICES},
            )
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    # Required and never null. OpenAI leaves it out only on assistant messages with tool calls (openai-python
    # 3.60, ChatCompletionAssistantMessageParam), and this server has no tool calls.
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """Return the message text; list content keeps only its `text` parts."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        # max_completion_tokens is the newer OpenAI name; it wins when both are set.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltamux"
    delta: dict[str, Any] | None = Field(None, description="The delta file's metadata; None for the base.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DeltaInfo(BaseModel):
    task: str
    method: str
    params: dict[str, Any]
    base_fingerprint: str
    nnz: int
    nbytes: int
    file_bytes: int
    created: str
    format_version: int


class DeltaList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeltaInfo]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
