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
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltastore.apply import AppliedDelta, apply, restore
from deltastore.format import DeltaFormatError
from server.generation import FINISH_CANCELLED, Completion, SamplingParams, SequenceInput, generate
from server.metrics import STAGE_APPLY, STAGE_RESTORE, Metrics
from server.mixing import MixedBatch, NotMixable, RowDelta, prepare
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
BATCHING_PER_TASK = "per-task"
BATCHING_MIXED = "mixed"


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


class _TaskUnavailable(Exception):
    """A task's delta cannot be had (deleted, or its file vanished); its requests fail with `kind`."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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
        if batching not in (BATCHING_PER_TASK, BATCHING_MIXED):
            raise ValueError(f"invalid batching {batching!r}; choose {BATCHING_PER_TASK!r} or {BATCHING_MIXED!r}")
        if batching == BATCHING_MIXED and swap_mode == SWAP_MODE_FULL:
            raise ValueError("mixed batching needs decoded deltas; use swap mode 'exact' or 'subtract' with it, not 'full'")
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
        self.mixed_batch_count = 0
        # Deltas prepared for mixed batches, by (task, version). A batch needs at most max_batch_size.
        # NOTE: this cache is bounded by count (2 x max_batch_size), not bytes. The device cache
        # budget does not include it, and each entry takes about 9 bytes per kept value.
        self._row_deltas: OrderedDict[tuple[str, int], RowDelta] = OrderedDict()
        self._not_mixable: dict[str, int] = {}  # task -> the version found not mixable; cleared on delete

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
                waiting = "1 request is" if queued == 1 else f"{queued} requests are"
                raise QueueFull(
                    f"{waiting} already queued (max_queued_requests {self.max_queued_requests}); retry later"
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
            # A task registered again under this name gets a fresh mixability check.
            self._not_mixable.pop(task, None)
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
        logger.info(
            "engine loop started on %s (batch %d, time slice %.3f s, %s batching)",
            self.device, self.max_batch_size, self.time_slice, self.batching,
        )
        while True:
            # 1. Wait for work, then pick the task whose oldest request has waited longest.
            with self._cond:
                while not self._stopping and not any(self._queues.values()):
                    self._cond.wait()
                if self._stopping:
                    break
                task = min((q[0].arrival, name) for name, q in self._queues.items() if q)[1]
                fills_batch = len(self._queues[task]) >= self.max_batch_size

            # 2. Mixed batching: unless that task fills a batch alone, take the oldest requests of any tasks.
            if self.batching == BATCHING_MIXED and not fills_batch:
                batch, tasks = self._take_mixed_batch()
                try:
                    self._run_mixed_batch(batch, tasks)
                except Exception as e:  # an unexpected failure must not kill the loop that serves every task
                    logger.exception("a batch of %d requests of tasks %s failed", len(batch), sorted(tasks))
                    for request in batch:
                        _fail(request, ErrorKind.INTERNAL, f"serving the batch failed: {e}")
                continue

            # 3. Put that task's weights in place; on failure its queued requests fail.
            try:
                switched = self._switch_to(task)
            except Exception as e:  # an unexpected swap failure must not kill the loop that serves every task
                logger.exception("swap to task %s failed", task)
                self._fail_queue(task, ErrorKind.INTERNAL, f"switching to task {task!r} failed: {e}")
                continue
            if not switched:
                continue

            # 4. Serve the task's queue in batches until it is empty or its time slice is over.
            slice_start = time.monotonic()
            while True:
                batch = self._take_batch(task)
                if not batch:
                    break
                self._run_batch(batch)
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

    def _run_batch(self, batch: list[EngineRequest], *, mixing: MixedBatch | None = None) -> None:
        """Generate one batch on the current weights; with `mixing`, its hooks add each row's delta."""
        started = time.monotonic()
        for request in batch:
            self.metrics.queue_wait.labels(task=request.task).observe(started - request.arrival)
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
                self.model, self.tokenizer, sequences, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                on_rows=None if mixing is None else mixing.set_active,
            )
        except Exception as e:  # one failed batch must not stop the loop that serves every task
            tasks = sorted({request.task for request in batch})
            logger.exception("generation failed for a batch of %d requests of tasks %s", len(batch), tasks)
            for request in batch:
                _fail(request, ErrorKind.INTERNAL, f"generation failed: {e}")
            return

        finished = time.monotonic()
        for request, completion in zip(batch, completions, strict=True):
            if completion.finish_reason == FINISH_CANCELLED:
                continue
            self.metrics.tokens_generated.labels(task=request.task).inc(completion.completion_tokens)
            self.metrics.prompt_tokens.labels(task=request.task).inc(completion.prompt_tokens)
            self.metrics.request_latency.labels(task=request.task).observe(finished - request.arrival)
            request.emit(DoneEvent(index=request.index, completion=completion))

    # -- mixed batches ---------------------------------------------------------------------

    def _take_mixed_batch(self) -> tuple[list[EngineRequest], set[str]]:
        """Take the oldest queued requests of tasks that can be mixed, up to `max_batch_size`.

        Returns the batch and its tasks. When the oldest request's task cannot be mixed, the
        batch contains that task's requests only.
        """
        with self._cond:
            if self.max_batch_wait > 0 and sum(len(q) for q in self._queues.values()) < self.max_batch_size:
                self._cond.wait(self.max_batch_wait)  # let requests that arrive together share the batch
            if self._stopping:
                return [], set()
            waiting = sorted(
                ((request.arrival, request.request_id, name) for name, queue in self._queues.items() for request in queue)
            )
            if not waiting:
                return [], set()
            oldest_task = waiting[0][2]
            if not self._mixable(oldest_task):
                allowed = {oldest_task}
            else:
                allowed = {name for name in self._queues if self._mixable(name)}
            chosen = [name for _, _, name in waiting if name in allowed][: self.max_batch_size]
            counts: dict[str, int] = {}
            for name in chosen:
                counts[name] = counts.get(name, 0) + 1
            batch: list[EngineRequest] = []
            for name, count in counts.items():
                queue = self._queues[name]
                for _ in range(count):
                    request = queue.popleft()
                    if not request.cancelled:
                        batch.append(request)
                self.metrics.queue_depth.labels(task=name).set(len(queue))
        batch.sort(key=lambda request: request.arrival)
        return batch, {request.task for request in batch}

    def _mixable(self, task: str) -> bool:
        """False only for a task already found not mixable; unknown tasks are tried."""
        if task == self.base_name:
            return True
        return task not in self._not_mixable

    def _run_mixed_batch(self, batch: list[EngineRequest], tasks: set[str]) -> None:
        """Run rows of several tasks together on the base weights, each row with its own delta.

        A batch of one task (all that was waiting, or all that is left) runs on merged weights.
        """
        if len(tasks) == 1:
            self._run_merged(batch)
            return

        # 1. Prepare every task's row delta. A task that cannot be mixed goes back to its queue;
        #    one whose delta is gone fails its requests.
        row_deltas: dict[str, RowDelta | None] = {self.base_name: None}
        for task in sorted(tasks - {self.base_name}):
            requests = [request for request in batch if request.task == task]
            try:
                prepared = self._row_delta(task)
            except _TaskUnavailable as e:
                for request in requests:
                    _fail(request, e.kind, str(e))
                continue
            if prepared is None:
                self._requeue(requests)
                continue
            row_deltas[task] = prepared
        batch = [request for request in batch if request.task in row_deltas]
        remaining = {request.task for request in batch}
        if not batch:
            return
        if len(remaining) == 1:
            self._run_merged(batch)
            return

        # 2. The base weights in place, then one generation with per-row hooks.
        self._switch_to(self.base_name)
        self.mixed_batch_count += 1
        self.metrics.mixed_batches.inc()
        logger.debug("mixed batch of %d requests over tasks %s", len(batch), sorted(remaining))
        with MixedBatch(self.model, [row_deltas[request.task] for request in batch]) as mixing:
            self._run_batch(batch, mixing=mixing)

    def _run_merged(self, batch: list[EngineRequest]) -> None:
        """Serve a taken batch of one task on its merged weights; fail it if the task is gone."""
        if not batch:
            return
        task = batch[0].task
        if self._switch_to(task):
            self._run_batch(batch)
            return
        # The switch failed the task's queue, but these requests had already left it.
        for request in batch:
            _fail(request, ErrorKind.NOT_FOUND, f"task {task!r} is no longer in the delta store")

    def _row_delta(self, task: str) -> RowDelta | None:
        """Return `task`'s delta prepared for mixing, or None when it cannot be mixed.

        Raises _TaskUnavailable when the task or its delta file is gone.
        """
        try:
            entry = self.store.get(task)
        except TaskNotFound as e:
            raise _TaskUnavailable(ErrorKind.NOT_FOUND, str(e)) from e
        key = (task, entry.version)
        cached = self._row_deltas.get(key)
        if cached is not None:
            self._row_deltas.move_to_end(key)
            return cached
        if self._not_mixable.get(task) == entry.version:
            return None
        try:
            decoded = self.residency.fetch(entry).decoded
        except DeltaFormatError as e:
            logger.error("cannot load the delta of task %s: %s", task, e)
            self.store.forget(task)
            self.residency.evict(task)
            raise _TaskUnavailable(ErrorKind.NOT_FOUND, f"the delta of task {task!r} could not be loaded: {e}") from e
        try:
            prepared = prepare(self.model, decoded)
        except NotMixable as e:
            self._not_mixable[task] = entry.version
            logger.warning("task %s is served in batches of its own: %s", task, e)
            return None
        logger.info("prepared task %s for mixed batches: %d bytes", task, prepared.nbytes)
        self._row_deltas[key] = prepared
        while len(self._row_deltas) > 2 * self.max_batch_size:
            self._row_deltas.popitem(last=False)
        return prepared

    def _requeue(self, requests: list[EngineRequest]) -> None:
        """Put requests back at the front of their queues, oldest first."""
        with self._cond:
            for request in sorted(requests, key=lambda r: r.arrival, reverse=True):
                self._queues.setdefault(request.task, deque()).appendleft(request)
            self._cond.notify_all()

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
