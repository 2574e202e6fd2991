"""The engine loop: the one thread that owns the resident weights.

Requests queue per task (the base is a task too, under the base model id). The loop serves the
current task's queue in batches of up to `max_batch_size` for at most `time_slice` seconds while
other tasks wait, then switches to the task whose oldest request has waited longest, so no task
starves. A switch restores the current delta and applies the next one. Weights change only
between batches and every batch belongs to one task, so no request runs with another task's
weights.

Deleting a task while it has requests in flight: its queued requests fail with a 404-style error
at once, and a batch already running finishes on the weights it started with. The deleted delta
stays applied until the next switch restores it, which `AppliedDelta` can always do because it
keeps its own reference to the decoded delta and the saved base values.

In the `full` swap mode (a baseline) a switch copies the task's whole fine-tuned tensors in from
CPU memory instead, and a restore copies the base tensors back (see server/residency.py).

Handlers talk to the loop through `submit` (thread-safe) and receive events through the
`EngineRequest.emit` callback, which must itself be safe to call from the engine thread.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltastore.apply import AppliedDelta, apply, restore
from deltastore.format import DeltaFormatError
from server.generation import FINISH_CANCELLED, Completion, SamplingParams, SequenceInput, generate
from server.metrics import STAGE_APPLY, STAGE_RESTORE, Metrics
from server.residency import FullWeights, Residency, synchronize
from server.store import Store, TaskNotFound

logger = logging.getLogger(__name__)


class ErrorKind(enum.Enum):
    """Failure cause of an engine request; the API maps each to an HTTP status."""

    NOT_FOUND = "not_found"  # the task was deleted (or its file vanished) before the request ran
    UNAVAILABLE = "unavailable"  # the engine is shutting down
    INTERNAL = "internal"  # generation or a swap failed


@dataclass(frozen=True)
class TextEvent:
    index: int
    text: str


@dataclass(frozen=True)
class DoneEvent:
    index: int
    completion: Completion


@dataclass(frozen=True)
class ErrorEvent:
    index: int
    kind: ErrorKind
    message: str


Event = TextEvent | DoneEvent | ErrorEvent

_request_ids = itertools.count(1)

SWAP_MODE_FULL = "full"  # the baseline that copies whole tensors; the other modes go through deltastore.apply


@dataclass(eq=False)
class EngineRequest:
    """One sequence to generate for one task; `index` is its choice index in the API response."""

    task: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    index: int = 0
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    request_id: int = field(default_factory=lambda: next(_request_ids))
    first_token_at: float | None = None


class EngineStopped(RuntimeError):
    """The engine is not running, so it takes no requests."""


class QueueFull(RuntimeError):
    """Queuing the requests would exceed `max_queued_requests`."""


@dataclass
class _Applied:
    task: str
    version: int
    applied: AppliedDelta | None  # None in the full mode
    full: FullWeights | None = None  # set in the full mode only


class Engine:
    """Owns the model weights; runs batches per task and swaps deltas between them."""

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        params: Mapping[str, torch.Tensor],
        store: Store,
        residency: Residency,
        metrics: Metrics,
        base_name: str,
        swap_mode: str,
        max_batch_size: int,
        time_slice: float,
        max_batch_wait: float,
        max_queued_requests: int,
        batching: str = "per-task",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.params = params
        self.store = store
        self.residency = residency
        self.metrics = metrics
        self.base_name = base_name
        self.swap_mode = swap_mode
        self.max_batch_size = max_batch_size
        self.time_slice = time_slice
        self.max_batch_wait = max_batch_wait
        self.max_queued_requests = max_queued_requests
        self.batching = batching
        self.device = next(model.parameters()).device
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.pad_token_id = _pad_token_id(tokenizer, self.eos_token_ids)

        self._queues: dict[str, deque[EngineRequest]] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._applied: _Applied | None = None  # None: the weights are the base
        self.swap_count = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def current_task(self) -> str:
        applied = self._applied
        return self.base_name if applied is None else applied.task

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deltamux-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the loop after its current batch, fail queued requests and restore the base weights."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("the engine loop did not stop within %.0f s; the weights are left as they are", timeout)
                return
        with self._cond:
            leftover = [request for queue in self._queues.values() for request in queue]
            self._queues.clear()
        for request in leftover:
            _fail(request, ErrorKind.UNAVAILABLE, "the server is shutting down; retry on another instance")
        self._restore_base()

    # -- requests --------------------------------------------------------------------------

    def submit(self, requests: list[EngineRequest]) -> None:
        """Queue requests, all or none; requests queued before `start` wait for the loop."""
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine has stopped; the server is shutting down")
            queued = sum(len(queue) for queue in self._queues.values())
            if queued + len(requests) > self.max_queued_requests:
                raise QueueFull(
                    f"{queued} requests are already queued (max_queued_requests {self.max_queued_requests}); retry later"
                )
            for request in requests:
                self._queues.setdefault(request.task, deque()).append(request)
            for task in {request.task for request in requests}:
                self.metrics.queue_depth.labels(task=task).set(len(self._queues[task]))
            self._cond.notify_all()

    def drop_task(self, task: str) -> int:
        """Fail every queued request of `task` (it was deleted); return how many there were."""
        with self._cond:
            queue = self._queues.pop(task, deque())
            self.metrics.queue_depth.labels(task=task).set(0)
        for request in queue:
            _fail(request, ErrorKind.NOT_FOUND, f"task {task!r} was deleted before this request ran")
        if queue:
            logger.info("task %s deleted: failed %d queued requests", task, len(queue))
        return len(queue)

    def queue_depths(self) -> dict[str, int]:
        with self._cond:
            return {task: len(queue) for task, queue in self._queues.items() if queue}

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        logger.info("engine loop started on %s (batch %d, time slice %.3f s)", self.device, self.max_batch_size, self.time_slice)
        while True:
            # 1. Wait for work, then pick the task whose oldest request has waited longest.
            with self._cond:
                while not self._stopping and not any(self._queues.values()):
                    self._cond.wait()
                if self._stopping:
                    break
                task = min((q[0].arrival, name) for name, q in self._queues.items() if q)[1]

            # 2. Put that task's weights in place; on failure its queued requests fail.
            try:
                switched = self._switch_to(task)
            except Exception as e:  # an unexpected swap failure must not kill the loop that serves every task
                logger.exception("swap to task %s failed", task)
                self._fail_queue(task, ErrorKind.INTERNAL, f"switching to task {task!r} failed: {e}")
                continue
            if not switched:
                continue

            # 3. Serve the task's queue in batches until it is empty or its time slice is over.
            slice_start = time.monotonic()
            while True:
                batch = self._take_batch(task)
                if not batch:
                    break
                self._run_batch(task, batch)
                if time.monotonic() - slice_start >= self.time_slice and self._others_waiting(task):
                    break
        logger.info("engine loop stopped")

    def _take_batch(self, task: str) -> list[EngineRequest]:
        with self._cond:
            queue = self._queues.get(task)
            if not queue or self._stopping:
                return []
            # A short wait lets requests that arrive together share one batch.
            if len(queue) < self.max_batch_size and self.max_batch_wait > 0 and not self._stopping:
                self._cond.wait(self.max_batch_wait)
                queue = self._queues.get(task, deque())
            batch = []
            while queue and len(batch) < self.max_batch_size:
                request = queue.popleft()
                if not request.cancelled:
                    batch.append(request)
            self.metrics.queue_depth.labels(task=task).set(len(queue))
            return batch

    def _others_waiting(self, task: str) -> bool:
        with self._cond:
            return any(queue for name, queue in self._queues.items() if name != task)

    def _run_batch(self, task: str, batch: list[EngineRequest]) -> None:
        started = time.monotonic()
        for request in batch:
            self.metrics.queue_wait.labels(task=task).observe(started - request.arrival)
        self.metrics.batch_size.observe(len(batch))
        sequences = [
            SequenceInput(
                prompt_ids=request.prompt_ids,
                params=request.params,
                on_text=_text_forwarder(request, self.metrics),
                is_cancelled=lambda request=request: request.cancelled,
            )
            for request in batch
        ]
        try:
            completions = generate(
                self.model, self.tokenizer, sequences, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id
            )
        except Exception as e:  # one failed batch must not stop the loop that serves every task
            logger.exception("generation failed for a batch of %d requests of task %s", len(batch), task)
            for request in batch:
                _fail(request, ErrorKind.INTERNAL, f"generation failed: {e}")
            return

        finished = time.monotonic()
        for request, completion in zip(batch, completions, strict=True):
            if completion.finish_reason == FINISH_CANCELLED:
                continue
            self.metrics.tokens_generated.labels(task=task).inc(completion.completion_tokens)
            self.metrics.prompt_tokens.labels(task=task).inc(completion.prompt_tokens)
            self.metrics.request_latency.labels(task=task).observe(finished - request.arrival)
            request.emit(DoneEvent(index=request.index, completion=completion))

    # -- swaps -----------------------------------------------------------------------------

    def _switch_to(self, task: str) -> bool:
        """Make the weights `task`'s; return False (requests failed) if its delta cannot be had."""
        # 1. Find and fetch the next delta before touching the weights, so a failure leaves them valid.
        fetched = None
        full = None
        version = 0
        if task != self.base_name:
            try:
                entry = self.store.get(task)
                version = entry.version
                if self._applied is not None and (self._applied.task, self._applied.version) == (task, version):
                    return True
                if self.swap_mode == SWAP_MODE_FULL:
                    full, _ = self.residency.fetch_full(entry, self.params)
                else:
                    fetched = self.residency.fetch(entry)
            except TaskNotFound as e:
                self._fail_queue(task, ErrorKind.NOT_FOUND, str(e))
                return False
            except DeltaFormatError as e:
                # The file vanished or changed after it was listed (read_delta reports both this way).
                logger.error("cannot load the delta of task %s: %s", task, e)
                self.store.forget(task)
                self.residency.evict(task)
                self._fail_queue(task, ErrorKind.NOT_FOUND, f"the delta of task {task!r} could not be loaded: {e}")
                return False
        elif self._applied is None:
            return True

        # 2. Restore the current delta, then apply the next.
        previous = self.current_task
        restore_s = self._restore_base()
        apply_s = 0.0
        if full is not None:
            start = time.perf_counter()
            with torch.no_grad():
                for name, tensor in full.tensors.items():
                    self.params[name].data.copy_(tensor, non_blocking=True)
            synchronize(self.device)
            apply_s = time.perf_counter() - start
            self.metrics.observe_stage(STAGE_APPLY, apply_s)
            self._applied = _Applied(task=task, version=version, applied=None, full=full)
        elif fetched is not None:
            start = time.perf_counter()
            # NOTE: apply checks every target tensor before it writes, so a failure leaves the base
            # intact. Only a device error in the middle of the writes (out of memory) could not be undone.
            applied = apply(self.params, fetched.decoded, mode=self.swap_mode)
            synchronize(self.device)
            apply_s = time.perf_counter() - start
            self.metrics.observe_stage(STAGE_APPLY, apply_s)
            self._applied = _Applied(task=task, version=version, applied=applied)

        self.swap_count += 1
        self.metrics.swaps.inc()
        if fetched is not None:
            nnz, source = fetched.decoded.nnz, fetched.tier
            disk_ms, copy_ms = fetched.disk_load_s * 1e3, fetched.copy_s * 1e3
        else:
            nnz, source, disk_ms, copy_ms = 0, "full" if full is not None else "-", 0.0, 0.0
        logger.info(
            "swap %s -> %s: nnz %d, from %s, disk %.1f ms, copy %.1f ms, restore %.1f ms, apply %.1f ms",
            previous, task, nnz, source, disk_ms, copy_ms, restore_s * 1e3, apply_s * 1e3,
        )
        return True

    def _restore_base(self) -> float:
        """Restore the applied delta, if any; return the seconds it took."""
        if self._applied is None:
            return 0.0
        start = time.perf_counter()
        if self._applied.full is not None:
            with torch.no_grad():
                for name in self._applied.full.tensors:
                    self.params[name].data.copy_(self.residency.full_base(name), non_blocking=True)
        else:
            restore(self.params, self._applied.applied)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        self.metrics.observe_stage(STAGE_RESTORE, seconds)
        self._applied = None
        return seconds

    def _fail_queue(self, task: str, kind: ErrorKind, message: str) -> None:
        with self._cond:
            queue = self._queues.pop(task, deque())
            self.metrics.queue_depth.labels(task=task).set(0)
        for request in queue:
            _fail(request, kind, message)


def _text_forwarder(request: EngineRequest, metrics: Metrics) -> Callable[[str], None]:
    """Forward non-empty text pieces of one request; the first token also records the TTFT."""

    def forward(piece: str) -> None:
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
            metrics.time_to_first_token.labels(task=request.task).observe(request.first_token_at - request.arrival)
        if piece:
            request.emit(TextEvent(index=request.index, text=piece))

    return forward


def _fail(request: EngineRequest, kind: ErrorKind, message: str) -> None:
    request.emit(ErrorEvent(index=request.index, kind=kind, message=message))


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Collect end-of-sequence ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    sources = (getattr(model, "generation_config", None), model.config, tokenizer)
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _pad_token_id(tokenizer: PreTrainedTokenizerBase, eos_token_ids: frozenset[int]) -> int:
    # Padded positions are masked out, so any valid id works; prefer the tokenizer's pad token.
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return min(eos_token_ids) if eos_token_ids else 0
