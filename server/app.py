"""The FastAPI app: factory, lifespan, and the model, delta and health routes.

The base model, the store and the engine are loaded in the lifespan, never at import, and reach
handlers through `Depends(get_runtime)`. The completion routes live in server/completions.py.

Delta uploads (`POST /v1/deltas?task=NAME`) take the raw delta file as the request body
(`Content-Type: application/octet-stream`), so a large file streams to disk without a multipart
parser. The file is verified in full before the task becomes visible.

`RequestGuard` wraps the app: while the server drains after SIGTERM every /v1 request gets 503,
and a JSON body larger than `max_request_bytes` gets 413 before any handler parses it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastapi import Depends, FastAPI, Query, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from deltastore.apply import model_params, pack_parameters
from deltastore.checkpoint import Checkpoint, fingerprint
from deltastore.format import MAKE_DELTA_HINT, DeltaFormatError, NotADeltaFile
from server.auth import Principal, load_keys, require_admin, require_key
from server.engine import Engine
from server.errors import (
    MISSING_FIELD,
    MODEL_NOT_FOUND,
    APIError,
    error_response,
    install_error_handlers,
    model_not_found_message,
    plural,
)
from server.metrics import Metrics
from server.protocol import DeltaInfo, DeltaList, ModelCard, ModelList
from server.residency import Residency
from server.settings import Placement, Settings, resolve_placement
from server.store import Store, StoredTask, TaskExists, TaskNotFound

logger = logging.getLogger(__name__)

# Error codes of the routes in this file (README.md lists every code the API sends).
SHUTTING_DOWN = "server_shutting_down"
NOT_READY = "server_not_ready"
LOAD_FAILED = "model_load_failed"
FILE_TOO_LARGE = "file_too_large"
REQUEST_TOO_LARGE = "request_too_large"


@dataclass
class Runtime:
    """Everything the lifespan loads; handlers receive it through `Depends(get_runtime)`."""

    settings: Settings
    placement: Placement
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    base_name: str
    base_fingerprint: str
    context_length: int
    store: Store
    residency: Residency
    engine: Engine
    metrics: Metrics
    created: int  # base folder modification time, reported as the models' `created`


def load_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    """Load the base model and tokenizer, index the store and build the engine (not started)."""
    # 1. Device, dtype and the base's identity.
    placement = resolve_placement(settings)
    base = Path(settings.base)
    base_name = settings.base_name or base.resolve().name
    base_fingerprint = fingerprint(base)

    # 2. The resident model and its tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=placement.dtype)
    model.to(placement.device).eval()
    # One buffer per dtype lets a swap reach every sparse tensor of a delta with one indexing call.
    pack_parameters(model_params(model))
    params = model_params(model)
    text_config = model.config.get_text_config()
    context_length = int(getattr(text_config, "max_position_embeddings", 0) or tokenizer.model_max_length)

    # 3. Store, residency and the engine that owns the weights.
    store = Store(
        Path(settings.store), base_fingerprint=base_fingerprint, params=params, reserved=frozenset({base_name})
    )
    store.scan()
    residency = Residency(
        store, device=placement.device, device_cache_bytes=settings.device_cache_bytes,
        cpu_cache_bytes=settings.cpu_cache_bytes, metrics=metrics, params=params,
    )
    engine = Engine(
        model=model, tokenizer=tokenizer, params=params, store=store, residency=residency, metrics=metrics,
        base_name=base_name, swap_mode=settings.swap_mode.value, max_batch_size=settings.max_batch_size,
        time_slice=settings.time_slice, max_batch_wait=settings.max_batch_wait,
        max_queued_requests=settings.max_queued_requests, batching=settings.batching.value,
    )
    metrics.tasks.set(len(store.tasks()))

    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    logger.info(
        "base model %s (%s): %d parameters, %d bytes, context %d tokens",
        base_name, base, sum(p.numel() for p in params.values()), weight_bytes, context_length,
    )
    logger.info("device %s, dtype %s (%s), swap mode %s", placement.device, placement.dtype, placement.reason,
                settings.swap_mode.value)
    logger.info("store %s: %s, %d bytes", store.folder, plural(len(store.tasks()), "task"), store.total_bytes())
    return Runtime(
        settings=settings, placement=placement, model=model, tokenizer=tokenizer, base_name=base_name,
        base_fingerprint=base_fingerprint, context_length=context_length, store=store, residency=residency,
        engine=engine, metrics=metrics, created=int(base.stat().st_mtime),
    )


def get_runtime(request: Request) -> Runtime:
    """Return the loaded runtime; raise a 503 APIError while the server loads, has failed or stops."""
    state = request.app.state
    if state.draining:
        raise APIError(
            503, "the server is shutting down; retry on another instance", code=SHUTTING_DOWN, headers=_retry_after(state)
        )
    if state.load_error is not None:
        raise APIError(503, f"the server is not ready: loading the base model failed: {state.load_error}", code=LOAD_FAILED)
    if state.runtime is None or not state.runtime.engine.running:
        raise APIError(
            503, "the server is not ready: the base model is loading or the engine has stopped; retry in a few seconds",
            code=NOT_READY,
        )
    return state.runtime


async def _load_in_background(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Load the runtime off the event loop and start the engine; record the error if loading fails."""
    try:
        runtime = await asyncio.to_thread(load_runtime, settings, metrics)
    except Exception as e:  # any failure leaves a live process that reports it on /health and /ready
        logger.exception("loading the base model from %s failed", settings.base)
        app.state.load_error = f"{type(e).__name__}: {e}"
        return
    runtime.engine.start()
    app.state.runtime = runtime
    logger.info("ready: serving %s and %s", runtime.base_name, plural(len(runtime.store.tasks()), "task"))


def create_app(settings: Settings) -> FastAPI:
    """Build the app; the lifespan checks the settings and starts loading the base model.

    Cheap checks (device, dtype, the base folder's layout) run before the server accepts
    connections, so a wrong path fails `deltamux serve` at once. The weights then load in the
    background: /health returns 200 while they load (503 if loading failed), and /ready returns 200
    once the engine runs.
    """
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            resolve_placement(settings)
            Checkpoint.open(settings.base)
        except ValueError as e:  # CheckpointError is a ValueError
            logger.error("cannot start: %s", e)
            raise
        loader = asyncio.create_task(_load_in_background(app, settings, metrics))
        try:
            yield
        finally:
            if not loader.done():
                logger.info("waiting for the base model to finish loading before shutting down")
            await loader
            runtime, app.state.runtime = app.state.runtime, None
            if runtime is not None:
                await asyncio.to_thread(runtime.engine.stop)
                if runtime.engine.current_task == runtime.base_name:
                    logger.info("engine stopped; the resident weights are the base's again")
                else:
                    logger.error("engine did not stop; task %s is still applied", runtime.engine.current_task)

    app = FastAPI(title="deltamux", lifespan=lifespan)
    app.state.runtime = None
    app.state.load_error = None
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.draining = False  # set on SIGTERM by `deltamux serve`; /v1 routes and /ready then return 503
    # Read the keys here, not in the lifespan, so no request can ever be served before they apply.
    inline_keys = settings.api_keys.get_secret_value() if settings.api_keys is not None else None
    app.state.keys = load_keys(keys_file=settings.api_keys_file, inline=inline_keys)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, max_request_bytes=settings.max_request_bytes)

    from server.completions import router as completions_router  # noqa: PLC0415 (avoids an import cycle)

    app.include_router(completions_router)

    @app.get("/health")
    async def health(request: Request) -> dict:
        if request.app.state.load_error is not None:
            raise APIError(503, f"loading the base model failed: {request.app.state.load_error}", code=LOAD_FAILED)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> dict:
        get_runtime(request)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        if settings.metrics_require_key and request.app.state.keys is not None:
            require_admin(request)
        return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(
        principal: Principal = Depends(require_key), runtime: Runtime = Depends(get_runtime)
    ) -> ModelList:
        cards = [_base_card(runtime)] + [_task_card(entry) for entry in runtime.store.tasks()]
        return ModelList(data=[card for card in cards if principal.allows(card.id)])

    # `path` lets a base id with a slash ("org/model") through: the openai client (3.60) sends it as
    # %2F, and the server decodes that to '/' before routing.
    @app.get("/v1/models/{model:path}", response_model=ModelCard)
    async def retrieve_model(
        model: str, principal: Principal = Depends(require_key), runtime: Runtime = Depends(get_runtime)
    ) -> ModelCard:
        if not model:
            raise APIError(
                400, "the model id is missing from the path; send GET /v1/models/MODEL, or GET /v1/models for the list",
                param="model", code=MISSING_FIELD,
            )
        # A model outside the caller's tasks gets the same 404 as one that does not exist.
        not_found = APIError(404, model_not_found_message(model), param="model", code=MODEL_NOT_FOUND)
        if not principal.allows(model):
            logger.info("key %s asked for model %r outside its tasks", principal.name, model)
            raise not_found
        if model == runtime.base_name:
            return _base_card(runtime)
        try:
            return _task_card(runtime.store.get(model))
        except TaskNotFound as e:
            raise not_found from e

    @app.get("/v1/deltas", response_model=DeltaList)
    async def list_deltas(
        principal: Principal = Depends(require_admin), runtime: Runtime = Depends(get_runtime)
    ) -> DeltaList:
        return DeltaList(data=[_delta_info(entry) for entry in runtime.store.tasks()])

    @app.post("/v1/deltas", status_code=201, response_model=DeltaInfo)
    async def upload_delta(
        request: Request,
        task: str = Query(description="Task name the delta is served under; must match the file's metadata."),
        principal: Principal = Depends(require_admin),
        runtime: Runtime = Depends(get_runtime),
    ) -> DeltaInfo:
        entry = await _receive_delta(request, task=task, runtime=runtime)
        runtime.metrics.tasks.set(len(runtime.store.tasks()))
        logger.info("key %s registered task %s", principal.name, task)
        return _delta_info(entry)

    # Without this route, Starlette redirects the trailing slash to /v1/deltas with an empty 307.
    @app.delete("/v1/deltas/")
    async def delete_without_task(principal: Principal = Depends(require_admin)) -> dict:
        raise APIError(
            400, "the task name is missing from the path; send DELETE /v1/deltas/TASK, "
            "where GET /v1/deltas lists the tasks",
            param="task", code=MISSING_FIELD,
        )

    @app.delete("/v1/deltas/{task}")
    async def delete_delta(
        task: str, principal: Principal = Depends(require_admin), runtime: Runtime = Depends(get_runtime)
    ) -> dict:
        if task == runtime.base_name:
            raise APIError(
                400, f"{task!r} is the base model and cannot be deleted; delete a task instead", param="task",
                code="base_model_not_deletable",
            )
        try:
            runtime.store.delete(task)
        except TaskNotFound as e:
            raise APIError(404, str(e), param="task", code=MODEL_NOT_FOUND) from e
        # The file is gone first, so no new request can reach the task; then queued ones fail.
        dropped = runtime.engine.drop_task(task)
        runtime.residency.evict(task)
        runtime.metrics.tasks.set(len(runtime.store.tasks()))
        logger.info("key %s deleted task %s", principal.name, task)
        return {"id": task, "object": "delta", "deleted": True, "failed_queued_requests": dropped}

    return app


async def _receive_delta(request: Request, *, task: str, runtime: Runtime) -> StoredTask:
    """Stream the request body into the store, then verify and publish it as `task`."""
    limit = runtime.settings.max_upload_bytes

    # 1. Reject a bad name or a taken one before reading the body.
    try:
        runtime.store.check_new_name(task)
    except TaskExists as e:
        raise APIError(409, str(e), param="task", code="task_exists") from e
    except ValueError as e:
        raise APIError(400, str(e), param="task", code="invalid_task_name") from e
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413, f"the delta file is {plural(int(declared), 'byte')}; the limit is {plural(limit, 'byte')} (max_upload_bytes)",
            param="body", code=FILE_TOO_LARGE,
        )

    # 2. Stream to a hidden temporary file in the store folder.
    fd, upload = runtime.store.new_upload()
    try:
        size = 0
        with os.fdopen(fd, "wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(
                        413, f"the delta file is larger than the {limit}-byte limit (max_upload_bytes)",
                        param="body", code=FILE_TOO_LARGE,
                    )
                handle.write(chunk)
            # On disk before the rename publishes it, so a crash never leaves a listed but partial file.
            handle.flush()
            os.fsync(handle.fileno())
        if size == 0:
            raise APIError(
                400, f"invalid delta file: the request body is empty (0 bytes), so it is not a deltamux delta file; "
                f"{MAKE_DELTA_HINT}, then upload DIR/TASK.delta.safetensors",
                param="body", code="invalid_delta",
            )

        # 3. Verify in full (checksum, base fingerprint, names and shapes), then publish.
        try:
            return await run_in_threadpool(runtime.store.register, task, upload)
        except TaskExists as e:
            raise APIError(409, str(e), param="task", code="task_exists") from e
        except DeltaFormatError as e:
            # The reader names the file it read, which here is the hidden temporary upload.
            message = "invalid delta file: " + str(e).replace(repr(upload.name), "the uploaded file")
            if isinstance(e, NotADeltaFile):
                message += ", then upload DIR/TASK.delta.safetensors"
            raise APIError(422, message, param="body", code="invalid_delta") from e
    finally:
        upload.unlink(missing_ok=True)


def _base_card(runtime: Runtime) -> ModelCard:
    return ModelCard(id=runtime.base_name, created=runtime.created)


def _task_card(entry: StoredTask) -> ModelCard:
    return ModelCard(id=entry.task, created=_created(entry), delta=_delta_info(entry).model_dump())


def _delta_info(entry: StoredTask) -> DeltaInfo:
    metadata = entry.metadata
    return DeltaInfo(
        task=entry.task, method=metadata.method, params=metadata.params, base_fingerprint=metadata.base_fingerprint,
        nnz=metadata.nnz, nbytes=metadata.nbytes, file_bytes=entry.file_bytes, created=metadata.created,
        format_version=metadata.format_version,
    )


def _created(entry: StoredTask) -> int:
    try:
        return int(datetime.fromisoformat(entry.metadata.created).timestamp())
    except ValueError:
        return int(entry.path.stat().st_mtime) if entry.path.exists() else 0


def _retry_after(state) -> dict[str, str]:
    return {"Retry-After": str(state.settings.retry_after)}


def _counting_rejections(scope: Scope, send: Send, metrics: Metrics) -> Send:
    """Wrap `send` so an error status of a /v1 request increments `deltamux_rejected_requests`.

    The task label is the one a completion handler stores in `request.state.task` after it has
    resolved the model for the caller. Every other rejection is counted as task "unknown".
    """
    # Created here so the handler's `request.state` writes into this dict (Starlette keeps it in the scope).
    request_state = scope.setdefault("state", {})

    async def counting_send(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            metrics.count_rejected(status=message["status"], task=request_state.get("task"))
        await send(message)

    return counting_send


class RequestGuard:
    """ASGI middleware: 503 for /v1 while draining, 413 for a JSON body over `max_request_bytes`.

    A body within the limit is read here in full and handed to the app unchanged. Delta uploads
    (POST /v1/deltas) stream to disk under their own limit, `max_upload_bytes`, so they pass through.
    """

    def __init__(self, app: ASGIApp, *, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        state = scope["app"].state
        if path.startswith("/v1/"):
            send = _counting_rejections(scope, send, state.metrics)

        # 1. Draining: reject new API work. /health, /ready and /metrics still respond.
        if state.draining and path.startswith("/v1/"):
            response = error_response(503, "the server is shutting down; retry on another instance", code=SHUTTING_DOWN)
            response.headers.update(_retry_after(state))
            await response(scope, receive, send)
            return

        # 2. Body size: uploads and body-less methods pass through.
        if method not in ("POST", "PUT", "PATCH") or path == "/v1/deltas":
            await self.app(scope, receive, send)
            return
        limit = self.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send, f"the request body is {int(declared)} bytes")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client disconnected before it finished sending the body
            body += message.get("body", b"")
            if len(body) > limit:
                await self._too_large(scope, receive, send, "the request body is larger than that")
                return
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, found: str) -> None:
        message = f"{found}; the limit is {self.max_request_bytes} bytes (max_request_bytes)"
        logger.info("%s %s -> 413: %s", scope["method"], scope["path"], message)
        await error_response(413, message, code=REQUEST_TOO_LARGE)(scope, receive, send)
