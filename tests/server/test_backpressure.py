"""Overload: full queues get 429 with Retry-After, slow requests 504, gone clients are cancelled, big bodies 413.

The engine is held inside a batch with a gate around `generate`, so requests queue behind it
for as long as a test needs. Everything else (uvicorn, handlers, engine, model) is real.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import server.engine
from server.engine import EngineRequest
from server.settings import Settings
from tests.server.conftest import BASE_ID
from tests.server.support import LiveServer, start_server

MAX_REQUEST_BYTES = 50_001
RETRY_AFTER = 3
WAIT_S = 30.0  # upper bound for a condition to become true; tests never assert durations


@pytest.fixture(scope="module")
def busy(tiny_base: Path, delta_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("backpressure-store")
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], store / delta_files[task].name)
    settings = Settings(
        base=tiny_base, store=store, device="cpu", base_name=BASE_ID, max_tokens_default=8, max_queued_per_task=2,
        retry_after=RETRY_AFTER, max_request_bytes=MAX_REQUEST_BYTES, time_slice=0.05,
    )
    server = start_server(settings)
    yield server
    server.stop()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


@contextmanager
def engine_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Make the next batch wait inside `generate` until the block exits; yield the 'entered' event."""
    gate, entered = threading.Event(), threading.Event()
    real_generate = server.engine.generate

    def held_generate(*args, **kwargs):
        entered.set()
        gate.wait(WAIT_S)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(server.engine, "generate", held_generate)
    try:
        yield entered
    finally:
        gate.set()


def _captured_submissions(monkeypatch: pytest.MonkeyPatch, live: LiveServer) -> list[EngineRequest]:
    """Record every EngineRequest the handlers submit from now on."""
    engine = live.runtime.engine
    captured: list[EngineRequest] = []
    real_submit = engine.submit

    def recording_submit(requests: list[EngineRequest]) -> None:
        captured.extend(requests)
        real_submit(requests)

    monkeypatch.setattr(engine, "submit", recording_submit)
    return captured


def _complete(live: LiveServer, model: str, *, timeout: float = 60, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "I", "max_tokens": 3, "temperature": 0, **extra}
    return httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=timeout)


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def _start_blocker(live: LiveServer, pool: ThreadPoolExecutor, entered: threading.Event) -> Future:
    blocker = pool.submit(_complete, live, BASE_ID)
    assert entered.wait(WAIT_S), "the engine never started the blocking batch"
    return blocker


def test_task_queue_full_429_retry_after(busy, pool, monkeypatch) -> None:
    engine = busy.runtime.engine
    with engine_held(monkeypatch) as entered:
        blocker = _start_blocker(busy, pool, entered)
        queued = [pool.submit(_complete, busy, "alpha") for _ in range(2)]
        _wait_until(lambda: engine.queue_depths().get("alpha") == 2, "two alpha requests are queued")

        rejected = _complete(busy, "alpha")
        assert rejected.status_code == 429, rejected.text
        assert rejected.headers["retry-after"] == str(RETRY_AFTER)
        assert rejected.json()["error"]["code"] == "queue_full"
        assert "max_queued_per_task" in rejected.json()["error"]["message"]
        # Another task's queue has room.
        other = pool.submit(_complete, busy, "beta")
        _wait_until(lambda: engine.queue_depths().get("beta") == 1, "the beta request is queued")
    assert blocker.result().status_code == 200
    assert [f.result().status_code for f in queued] == [200, 200]
    assert other.result().status_code == 200


def test_choices_count_against_task_limit(busy, pool, monkeypatch) -> None:
    with engine_held(monkeypatch) as entered:
        blocker = _start_blocker(busy, pool, entered)
        rejected = _complete(busy, "beta", n=3)
        assert rejected.status_code == 429
        fits = pool.submit(_complete, busy, "beta", n=2)
    assert blocker.result().status_code == 200
    assert len(fits.result().json()["choices"]) == 2


def test_overall_queue_full_429(busy, pool, monkeypatch) -> None:
    engine = busy.runtime.engine
    monkeypatch.setattr(engine, "max_queued_requests", 1)
    with engine_held(monkeypatch) as entered:
        blocker = _start_blocker(busy, pool, entered)
        first = pool.submit(_complete, busy, "alpha")
        _wait_until(lambda: sum(engine.queue_depths().values()) == 1, "one request is queued")
        rejected = _complete(busy, "beta")
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"] == str(RETRY_AFTER)
        assert "max_queued_requests" in rejected.json()["error"]["message"]
    assert blocker.result().status_code == 200
    assert first.result().status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_request_timeout_504_cancels(busy, pool, monkeypatch, stream: bool) -> None:
    monkeypatch.setattr(busy.runtime.settings, "request_timeout", 0.3)
    captured = _captured_submissions(monkeypatch, busy)
    with engine_held(monkeypatch) as entered:
        blocker = _start_blocker(busy, pool, entered)
        captured.clear()  # the blocker's own request times out too; follow only the next one
        response = _complete(busy, "alpha", stream=stream)
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error["code"] == "timeout"
        assert error["type"] == "timeout_error"
        assert "request_timeout" in error["message"]
        assert len(captured) == 1
        assert captured[0].cancelled
    assert blocker.result().status_code == 504


def test_non_streaming_disconnect_cancels(busy, pool, monkeypatch) -> None:
    captured = _captured_submissions(monkeypatch, busy)
    with engine_held(monkeypatch) as entered:
        # The client gives up while its request sits in the held batch, then closes the connection.
        with pytest.raises(httpx.ReadTimeout):
            _complete(busy, "beta", timeout=1.0, max_tokens=20)
        assert entered.is_set()
        assert len(captured) == 1
        _wait_until(lambda: captured[0].cancelled, "the handler cancels the request of the gone client")

        # A queued request whose client leaves is cancelled as well.
        with pytest.raises(httpx.ReadTimeout):
            _complete(busy, "alpha", timeout=1.0)
        assert len(captured) == 2
        _wait_until(lambda: captured[1].cancelled, "the queued request is cancelled")
    after = _complete(busy, "beta")
    assert after.status_code == 200


def test_queued_stream_disconnect_cancels(busy, pool, monkeypatch) -> None:
    captured = _captured_submissions(monkeypatch, busy)
    with engine_held(monkeypatch) as entered:
        blocker = _start_blocker(busy, pool, entered)
        captured.clear()
        # No event can arrive while the engine is held, so the stream has not started yet.
        with pytest.raises(httpx.ReadTimeout):
            _complete(busy, "alpha", timeout=1.0, stream=True)
        _wait_until(lambda: bool(captured) and captured[0].cancelled, "the queued stream request is cancelled")
    assert blocker.result().status_code == 200


def test_body_over_limit_413(busy) -> None:
    body = '{"model": "%s", "prompt": "%s", "max_tokens": 2}' % (BASE_ID, "a " * MAX_REQUEST_BYTES)
    url = f"{busy.base_url}/v1/completions"
    declared = httpx.post(url, content=body.encode(), headers={"content-type": "application/json"})
    assert declared.status_code == 413, declared.text
    assert "max_request_bytes" in declared.json()["error"]["message"]

    # A chunked body declares no length; the server counts while reading.
    chunks = [body[i : i + 7001].encode() for i in range(0, len(body), 7001)]
    chunked = httpx.post(url, content=iter(chunks), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    chat = httpx.post(
        f"{busy.base_url}/v1/chat/completions",
        json={"model": BASE_ID, "messages": [{"role": "user", "content": "b" * MAX_REQUEST_BYTES}]},
    )
    assert chat.status_code == 413


def test_body_under_limit_served_chunked(busy) -> None:
    body = '{"model": "%s", "prompt": "I", "max_tokens": 2}' % BASE_ID
    chunks = [body[i : i + 5].encode() for i in range(0, len(body), 5)]
    response = httpx.post(f"{busy.base_url}/v1/completions", content=iter(chunks), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_draining_returns_503(busy) -> None:
    state = busy.app.state
    state.draining = True
    try:
        for method, path in [("POST", "/v1/completions"), ("GET", "/v1/models"), ("POST", "/v1/deltas")]:
            response = httpx.request(method, f"{busy.base_url}{path}", json={"model": BASE_ID, "prompt": "I"})
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"] == str(RETRY_AFTER)
        assert httpx.get(f"{busy.base_url}/ready").status_code == 503
        assert httpx.get(f"{busy.base_url}/health").status_code == 200
    finally:
        state.draining = False
    assert _complete(busy, BASE_ID).status_code == 200


def test_stream_timeout_mid_stream_ends_with_error(busy, monkeypatch) -> None:
    monkeypatch.setattr(busy.runtime.settings, "request_timeout", 0.5)
    gate = threading.Event()
    real_generate = server.engine.generate

    def stall_after_first(forward: Callable[[str], None]) -> Callable[[str], None]:
        sent: list[str] = []

        def stalled(piece: str) -> None:
            if sent:
                gate.wait(WAIT_S)
            sent.append(piece)
            forward(piece)

        return stalled

    def stalling_generate(model, tokenizer, sequences, **kwargs):
        # After its first token each sequence waits for the gate, so the stream starts and then stalls.
        for sequence in sequences:
            sequence.on_text = stall_after_first(sequence.on_text)
        return real_generate(model, tokenizer, sequences, **kwargs)

    monkeypatch.setattr(server.engine, "generate", stalling_generate)
    try:
        body = {"model": "alpha", "prompt": "I", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}
        response = httpx.post(f"{busy.base_url}/v1/completions", json=body, timeout=60)
    finally:
        gate.set()
    assert response.status_code == 200
    lines = [line for line in response.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: ") :])["error"]
    assert error["code"] == "timeout"
    assert "request_timeout" in error["message"]
