"""POST /v1/completions and POST /v1/chat/completions, plain and streaming (server-sent events).

Each prompt times `n` becomes one engine request (its choice index is prompt * n + j). With a
`seed`, choice j samples with seed + j, so choices differ but the whole response is reproducible.
A stream sends one event per generated text piece and ends with `data: [DONE]`. An error after
the stream has started arrives as a `data: {"error": ...}` event before `[DONE]`.

Admission and limits: a request that would put more than `max_queued_per_task` requests in its
task's queue, or more than `max_queued_requests` in all queues, gets 429 with Retry-After. A
request that has not finished `request_timeout` seconds after it was queued fails with 504. A
client that disconnects cancels its requests, streaming or not: the handler polls the connection
while it waits for the engine, and the engine drops cancelled sequences from their batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from server.app import Runtime, get_runtime
from server.auth import Principal, require_key
from server.engine import DoneEvent, EngineRequest, EngineStopped, ErrorEvent, ErrorKind, Event, QueueFull, TextEvent
from server.errors import MODEL_NOT_FOUND, APIError, error_body, model_not_found_message, plural
from server.generation import Completion, SamplingParams
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    Usage,
)
from server.store import TaskNotFound

logger = logging.getLogger(__name__)

router = APIRouter()

_STATUS_BY_KIND = {ErrorKind.NOT_FOUND: 404, ErrorKind.UNAVAILABLE: 503, ErrorKind.INTERNAL: 500}
_CODE_BY_KIND = {
    ErrorKind.NOT_FOUND: "model_not_found", ErrorKind.UNAVAILABLE: "server_shutting_down", ErrorKind.INTERNAL: "internal_error",
}
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks whether its client is still connected
CLIENT_CLOSED = 499  # the status nginx logs for a client that closed the connection; no client receives it


# -- request preparation --------------------------------------------------------------------


def _resolve_task(runtime: Runtime, model: str, principal: Principal) -> str:
    """Return the task that serves `model`, or raise a 404.

    A model outside the caller's tasks gets the same 404 as one that does not exist.
    """
    not_found = APIError(404, model_not_found_message(model), param="model", code=MODEL_NOT_FOUND)
    if not principal.allows(model):
        logger.info("key %s asked for model %r outside its tasks", principal.name, model)
        raise not_found
    if model == runtime.base_name:
        return model
    try:
        return runtime.store.get(model).task
    except TaskNotFound as e:
        raise not_found from e


def _token_budget(
    runtime: Runtime, *, prompt_tokens: int, requested: int | None, prompt_param: str, limit_param: str = "max_tokens"
) -> int:
    """Return max_tokens for one prompt; 400 if prompt plus max_tokens exceeds the context window.

    `prompt_param` and `limit_param` are the request fields the prompt and `requested` came from.
    """
    context = runtime.context_length

    # 1. A prompt that fills the window leaves no room for even one token, whatever max_tokens is.
    if prompt_tokens >= context:
        raise APIError(
            400, f"the prompt has {plural(prompt_tokens, 'token')}, but the context window is "
            f"{plural(context, 'token')} and must also hold the completion; shorten the prompt to at most "
            f"{plural(context - 1, 'token')}",
            param=prompt_param, code="context_length_exceeded",
        )

    # 2. Room is left: use max_tokens if it fits, else advise a value that does.
    if requested is None:
        return min(runtime.settings.max_tokens_default, context - prompt_tokens)
    if prompt_tokens + requested > context:
        raise APIError(
            400,
            f"the prompt ({plural(prompt_tokens, 'token')}) plus {limit_param} ({requested}) exceeds the context "
            f"window of {plural(context, 'token')}; shorten the prompt or lower {limit_param} to at most "
            f"{context - prompt_tokens}",
            param=limit_param, code="context_length_exceeded",
        )
    return requested


def _encode(runtime: Runtime, text: str, *, add_special_tokens: bool) -> list[int]:
    ids = runtime.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if not ids:
        raise APIError(
            400, "the prompt is empty after tokenization; send at least one token", param="prompt", code="empty_prompt"
        )
    return list(ids)


def _sampling(body: SamplingFields, *, max_tokens: int, choice: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=tuple(body.stop_list()),
        seed=None if body.seed is None else body.seed + choice, ignore_eos=body.ignore_eos,
    )


def _chat_prompt(runtime: Runtime, body: ChatCompletionRequest) -> str:
    """Render the messages with the tokenizer's chat template, ending with the assistant's turn."""
    if not runtime.tokenizer.chat_template:
        raise APIError(
            400, f"the model {runtime.base_name!r} has no chat template; use /v1/completions", param="messages",
            code="chat_template_missing",
        )
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return runtime.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (ValueError, TemplateError) as e:
        raise APIError(400, f"invalid messages: {e}", param="messages", code="invalid_value") from e


# -- the handoff between the engine thread and the handler ------------------------------------


class ClientDisconnected(Exception):
    """The client closed the connection while its request waited for the engine."""


@dataclass
class _Submission:
    """Engine requests of one HTTP request, the asyncio queue their events arrive on, and its limits."""

    requests: list[EngineRequest]
    queue: asyncio.Queue[Event]
    connection: Request
    deadline: float  # event-loop time after which the request fails with 504
    timeout: float

    @classmethod
    def submit(
        cls, runtime: Runtime, *, connection: Request, task: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> _Submission:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            # Called on the engine thread; the queue belongs to the event loop.
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:
                logger.debug("dropped an event for a closed event loop")

        requests = [
            EngineRequest(task=task, prompt_ids=ids, params=p, emit=emit, index=i)
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
        ]
        settings = runtime.settings
        retry_after = {"Retry-After": str(settings.retry_after)}
        # Only the engine thread takes requests out of a queue, so a depth read here can only be
        # too high by the time of the submit below, never too low: the per-task limit holds.
        queued = runtime.engine.queue_depths().get(task, 0)
        if queued + len(requests) > settings.max_queued_per_task:
            raise APIError(
                429, f"{plural(queued, 'request')} for model {task!r} already "
                f"{'is' if queued == 1 else 'are'} queued (max_queued_per_task {settings.max_queued_per_task}); "
                "retry later",
                code="queue_full", headers=retry_after,
            )
        try:
            runtime.engine.submit(requests)
        except EngineStopped as e:
            raise APIError(503, str(e), code="server_shutting_down", headers=retry_after) from e
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers=retry_after) from e
        timeout = settings.request_timeout
        return cls(requests=requests, queue=queue, connection=connection, deadline=loop.time() + timeout, timeout=timeout)

    async def events(self) -> AsyncIterator[Event]:
        """Yield events until every request is done or has failed.

        Raises APIError(504) once the deadline passes and ClientDisconnected when the client
        goes away; the caller cancels the requests in both cases.
        """
        loop = asyncio.get_running_loop()
        pending = {request.index for request in self.requests}
        while pending:
            remaining = self.deadline - loop.time()
            if remaining <= 0:
                raise APIError(
                    504, f"the request did not finish within {self.timeout:g} s (request_timeout); "
                    "lower max_tokens or retry when the server is less busy",
                    code="timeout",
                )
            try:
                event = await asyncio.wait_for(self.queue.get(), min(remaining, DISCONNECT_POLL_S))
            except TimeoutError:
                if await self.connection.is_disconnected():
                    raise ClientDisconnected from None
                continue
            if isinstance(event, (DoneEvent, ErrorEvent)):
                pending.discard(event.index)
            yield event

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True


def _api_error(event: ErrorEvent) -> APIError:
    return APIError(_STATUS_BY_KIND[event.kind], event.message, code=_CODE_BY_KIND[event.kind])


async def _collect(submission: _Submission) -> list[Completion]:
    """Wait for every completion of a non-streaming request; the first error fails the request."""
    results: dict[int, Completion] = {}
    try:
        async for event in submission.events():
            if isinstance(event, ErrorEvent):
                raise _api_error(event)
            if isinstance(event, DoneEvent):
                results[event.index] = event.completion
    finally:
        if len(results) < len(submission.requests):
            submission.cancel()
    return [results[i] for i in range(len(submission.requests))]


def _usage(completions: list[Completion], *, n: int) -> Usage:
    # Prompt tokens count once per prompt, completion tokens once per choice.
    prompt_tokens = sum(c.prompt_tokens for c in completions[::n])
    completion_tokens = sum(c.completion_tokens for c in completions)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _stream(
    runtime: Runtime, submission: _Submission, *, task: str, endpoint: str, chunks: _ChunkWriter
) -> StreamingResponse:
    """Start an SSE response once the first event arrives; an early error is a plain error response."""
    events = submission.events()
    try:
        first = await anext(events)
    except BaseException:
        submission.cancel()
        raise
    if isinstance(first, ErrorEvent):
        submission.cancel()
        raise _api_error(first)

    async def body() -> AsyncIterator[str]:
        completions: dict[int, Completion] = {}
        try:
            for piece in chunks.opening():
                yield _sse(piece)
            event: Event | None = first
            while event is not None:
                if isinstance(event, TextEvent):
                    yield _sse(chunks.text(event.index, event.text))
                elif isinstance(event, DoneEvent):
                    completions[event.index] = event.completion
                    yield _sse(chunks.finish(event.index, event.completion.finish_reason))
                else:
                    logger.warning("stream of task %s failed: %s", task, event.message)
                    yield _sse(error_body(_STATUS_BY_KIND[event.kind], event.message, code=_CODE_BY_KIND[event.kind]))
                    break
                try:
                    event = await anext(events, None)
                except APIError as e:  # the deadline passed mid-stream
                    logger.info("stream of task %s failed: %s", task, e.message)
                    yield _sse(error_body(e.status, e.message, code=e.code))
                    break
                except ClientDisconnected:
                    logger.info("client of a task %s stream disconnected; cancelling its requests", task)
                    return
            if len(completions) == len(submission.requests) and chunks.include_usage:
                ordered = [completions[i] for i in range(len(completions))]
                yield _sse(chunks.usage(_usage(ordered, n=chunks.n)))
            yield _sse("[DONE]")
        finally:
            if len(completions) < len(submission.requests):
                submission.cancel()

    runtime.metrics.requests.labels(task=task, endpoint=endpoint, status="200").inc()
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@dataclass
class _ChunkWriter:
    """Builds the stream chunks of one endpoint (completions or chat)."""

    chat: bool
    model: str
    n: int
    include_usage: bool
    echo_prompts: list[str] | None = None  # completions with echo: each choice starts with its prompt

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = 0

    def _chunk(self, choices: list[dict], usage: Usage | None = None) -> dict:
        if self.chat:
            chunk = ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model,
                choices=[ChatChunkChoice(**c) for c in choices], usage=usage,
            )
            return chunk.model_dump(exclude_none=False)
        return {
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": choices, "usage": None if usage is None else usage.model_dump(),
        }

    def opening(self) -> list[dict]:
        if self.chat:
            return [self._chunk([{"index": i, "delta": ChatDelta(role="assistant", content="")} for i in range(self.choices)])]
        if self.echo_prompts is not None:
            return [self.text(i, self.echo_prompts[i // self.n]) for i in range(self.choices)]
        return []

    def text(self, index: int, text: str) -> dict:
        if self.chat:
            return self._chunk([{"index": index, "delta": ChatDelta(content=text)}])
        return self._chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])

    def finish(self, index: int, reason: str) -> dict:
        if self.chat:
            return self._chunk([{"index": index, "delta": ChatDelta(), "finish_reason": reason}])
        return self._chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: Usage) -> dict:
        return self._chunk([], usage=usage)


# -- routes ---------------------------------------------------------------------------------


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    connection: Request,
    principal: Principal = Depends(require_key),
    runtime: Runtime = Depends(get_runtime),
) -> CompletionResponse | StreamingResponse:
    endpoint = "completions"
    task = _counted(runtime, endpoint, lambda: _resolve_task(runtime, body.model, principal))
    connection.state.task = task  # the label of deltamux_rejected_requests, set once the caller may see it
    try:
        # 1. Tokenize each prompt and size its completion.
        prompts = body.prompts()
        prompt_ids = [_encode(runtime, prompt, add_special_tokens=True) for prompt in prompts]
        budgets = [
            _token_budget(runtime, prompt_tokens=len(ids), requested=body.max_tokens, prompt_param="prompt")
            for ids in prompt_ids
        ]

        # 2. One engine request per choice.
        choice_ids = [ids for ids in prompt_ids for _ in range(body.n)]
        params = [_sampling(body, max_tokens=b, choice=j) for b in budgets for j in range(body.n)]
        submission = _Submission.submit(runtime, connection=connection, task=task, prompts=choice_ids, params=params)

        # 3. Stream, or wait for every choice.
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            writer = _ChunkWriter(
                chat=False, model=body.model, n=body.n, include_usage=include_usage,
                echo_prompts=prompts if body.echo else None,
            )
            writer.choices = len(choice_ids)
            return await _stream(runtime, submission, task=task, endpoint=endpoint, chunks=writer)
        results = await _collect(submission)
    except APIError as e:
        runtime.metrics.requests.labels(task=task, endpoint=endpoint, status=str(e.status)).inc()
        raise
    except ClientDisconnected:
        runtime.metrics.requests.labels(task=task, endpoint=endpoint, status=str(CLIENT_CLOSED)).inc()
        raise APIError(
            CLIENT_CLOSED, "the client closed the connection; its requests were cancelled", code="client_closed_request"
        ) from None
    runtime.metrics.requests.labels(task=task, endpoint=endpoint, status="200").inc()
    choices = [
        CompletionChoice(
            index=i, text=(prompts[i // body.n] if body.echo else "") + c.text, finish_reason=c.finish_reason
        )
        for i, c in enumerate(results)
    ]
    return CompletionResponse(model=body.model, choices=choices, usage=_usage(results, n=body.n))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    connection: Request,
    principal: Principal = Depends(require_key),
    runtime: Runtime = Depends(get_runtime),
) -> ChatCompletionResponse | StreamingResponse:
    endpoint = "chat"
    task = _counted(runtime, endpoint, lambda: _resolve_task(runtime, body.model, principal))
    connection.state.task = task
    try:
        # 1. Render the chat template once; every choice shares the prompt.
        prompt_ids = _encode(runtime, _chat_prompt(runtime, body), add_special_tokens=False)
        limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        budget = _token_budget(
            runtime, prompt_tokens=len(prompt_ids), requested=body.token_limit(), prompt_param="messages",
            limit_param=limit_param,
        )
        params = [_sampling(body, max_tokens=budget, choice=j) for j in range(body.n)]
        submission = _Submission.submit(
            runtime, connection=connection, task=task, prompts=[prompt_ids] * body.n, params=params
        )

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            writer = _ChunkWriter(chat=True, model=body.model, n=body.n, include_usage=include_usage)
            writer.choices = body.n
            return await _stream(runtime, submission, task=task, endpoint=endpoint, chunks=writer)
        results = await _collect(submission)
    except APIError as e:
        runtime.metrics.requests.labels(task=task, endpoint=endpoint, status=str(e.status)).inc()
        raise
    except ClientDisconnected:
        runtime.metrics.requests.labels(task=task, endpoint=endpoint, status=str(CLIENT_CLOSED)).inc()
        raise APIError(
            CLIENT_CLOSED, "the client closed the connection; its requests were cancelled", code="client_closed_request"
        ) from None
    runtime.metrics.requests.labels(task=task, endpoint=endpoint, status="200").inc()
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
        for i, c in enumerate(results)
    ]
    return ChatCompletionResponse(model=body.model, choices=choices, usage=_usage(results, n=body.n))


def _counted(runtime: Runtime, endpoint: str, resolve) -> str:
    """Resolve the model; an unknown one is counted under task "unknown" to bound label values."""
    try:
        return resolve()
    except APIError as e:
        runtime.metrics.requests.labels(task="unknown", endpoint=endpoint, status=str(e.status)).inc()
        raise
