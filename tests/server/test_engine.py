"""The engine loop without HTTP: scheduling order, swaps, deletion and shutdown."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deltastore.apply import model_params
from server.app import Runtime, load_runtime
from server.engine import DoneEvent, EngineRequest, EngineStopped, ErrorEvent, ErrorKind, Event, QueueFull
from server.generation import SamplingParams
from server.metrics import Metrics
from server.settings import Settings
from tests.server.support import reference_model, weights_hash


@pytest.fixture
def runtime(tiny_base: Path, delta_files: dict[str, Path], tmp_path: Path) -> Iterator[Runtime]:
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], tmp_path)
    settings = Settings(
        base=tiny_base, store=tmp_path, device="cpu", base_name="base", max_batch_size=2, time_slice=1e-6,
        max_batch_wait=0.0,
    )
    runtime = load_runtime(settings, Metrics())
    yield runtime
    runtime.engine.stop()


class Recorder:
    """Collects engine events from the engine thread, in the order they finish."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, int]] = []
        self.events: dict[tuple[str, int], Event] = {}
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        self.expected = 0

    def request(self, task: str, index: int, *, max_tokens: int = 4) -> EngineRequest:
        self.expected += 1

        def emit(event: Event) -> None:
            if isinstance(event, (DoneEvent, ErrorEvent)):
                with self.lock:
                    self.finished.append((task, index))
                    self.events[(task, index)] = event
                    if len(self.finished) == self.expected:
                        self.all_done.set()

        return EngineRequest(task=task, prompt_ids=[5, 9, 13], params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                             emit=emit, index=index)


def test_oldest_waiting_task_goes_next(runtime) -> None:
    # Queue 6 alpha, 1 beta, 6 alpha before the loop starts; batches of 2 with an expired slice.
    recorder = Recorder()
    requests = [recorder.request("alpha", i) for i in range(6)]
    requests.append(recorder.request("beta", 0))
    requests += [recorder.request("alpha", i) for i in range(6, 12)]
    for offset, request in enumerate(requests):
        request.arrival = 1000.0 + offset  # distinct, ordered arrival times
    runtime.engine.submit(requests)  # queued before the loop starts
    runtime.engine.start()

    assert recorder.all_done.wait(120)
    order = recorder.finished
    assert order.index(("beta", 0)) == 6  # after the 6 older alpha requests, before the 6 newer ones
    assert sorted(i for task, i in order if task == "alpha") == list(range(12))
    assert runtime.engine.swap_count == 3  # base -> alpha -> beta -> alpha


def test_base_restored_exactly_on_stop(runtime, tiny_base) -> None:
    recorder = Recorder()
    requests = [recorder.request(task, i) for i, task in enumerate(["alpha", "beta", "alpha", "base", "beta"])]
    runtime.engine.start()
    for request in requests:
        runtime.engine.submit([request])
        time.sleep(0.01)
    assert recorder.all_done.wait(120)
    runtime.engine.stop()
    fresh = model_params(reference_model(tiny_base, None))
    assert weights_hash(runtime.engine.params) == weights_hash(fresh)
    with pytest.raises(EngineStopped):
        runtime.engine.submit([recorder.request("alpha", 99)])


def test_drop_task_fails_queued_requests(runtime) -> None:
    recorder = Recorder()
    requests = [recorder.request("beta", i) for i in range(3)]
    runtime.engine.submit(requests)
    assert runtime.engine.drop_task("beta") == 3
    assert all(isinstance(e, ErrorEvent) and e.kind == ErrorKind.NOT_FOUND for e in recorder.events.values())
    assert runtime.engine.queue_depths() == {}


def test_request_for_deleted_task_fails_not_found(runtime) -> None:
    runtime.store.delete("beta")
    recorder = Recorder()
    runtime.engine.start()
    runtime.engine.submit([recorder.request("beta", 0), recorder.request("alpha", 0)])
    assert recorder.all_done.wait(120)
    assert isinstance(recorder.events[("beta", 0)], ErrorEvent)
    assert recorder.events[("beta", 0)].kind == ErrorKind.NOT_FOUND
    assert isinstance(recorder.events[("alpha", 0)], DoneEvent)


def test_cancelled_queued_request_skipped(runtime) -> None:
    recorder = Recorder()
    skipped = recorder.request("alpha", 0)
    skipped.cancelled = True
    kept = recorder.request("alpha", 1)
    recorder.expected = 1
    runtime.engine.start()
    runtime.engine.submit([skipped, kept])
    assert recorder.all_done.wait(120)
    assert recorder.finished == [("alpha", 1)]


def test_subtract_mode_serves_same_tokens(tiny_base, delta_files, tmp_path) -> None:
    # In float32, base + delta is the same sum in both modes; only the restore differs (it drifts).
    shutil.copy(delta_files["alpha"], tmp_path)
    settings = Settings(base=tiny_base, store=tmp_path, device="cpu", base_name="base", swap_mode="subtract")
    runtime = load_runtime(settings, Metrics())
    recorder = Recorder()
    requests = [recorder.request("alpha", 0, max_tokens=9), recorder.request("base", 1, max_tokens=9)]
    runtime.engine.start()
    try:
        for request in requests:
            runtime.engine.submit([request])
            time.sleep(0.01)
        assert recorder.all_done.wait(120)
    finally:
        runtime.engine.stop()

    reference = reference_model(tiny_base, delta_files["alpha"])
    with torch.no_grad():
        expected = reference.generate(torch.tensor([[5, 9, 13]]), max_new_tokens=9, do_sample=False)[0, 3:].tolist()
    assert recorder.events[("alpha", 0)].completion.token_ids == expected
    fresh = model_params(reference_model(tiny_base, None))
    drift = max((runtime.engine.params[name] - fresh[name]).abs().max().item() for name in fresh)
    assert drift < 1e-5


def test_queue_limit_rejects_whole_submission(runtime) -> None:
    runtime.engine.max_queued_requests = 3
    recorder = Recorder()
    runtime.engine.submit([recorder.request("alpha", i) for i in range(2)])
    with pytest.raises(QueueFull, match="max_queued_requests 3"):
        runtime.engine.submit([recorder.request("beta", i) for i in range(2)])
    assert runtime.engine.queue_depths() == {"alpha": 2}
