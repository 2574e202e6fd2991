"""SIGTERM drains a real `deltamux serve` process: in-flight requests finish, the base is restored, exit 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import BASE_ID

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120.0  # upper bound for start-up and for a drain; tests never assert durations
RESTORED_LOG = "the resident weights are the base's again"


def _free_port() -> int:
    # NOTE: another process could take the port between this probe and the server's bind. The serve
    # command binds by number, so it cannot take an already open socket as the in-process servers do.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServeProcess:
    """`deltamux serve` in a child process on a loopback port, its log in a file."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    @classmethod
    def start(cls, *, base: Path, store: Path, log_path: Path, extra: list[str] | None = None) -> ServeProcess:
        port = _free_port()
        command = [
            sys.executable, "-m", "server.cli", "serve", "--base", str(base), "--store", str(store),
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--base-name", BASE_ID, *(extra or []),
        ]
        log = log_path.open("wb")
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        served = cls(process=process, base_url=f"http://127.0.0.1:{port}", log_path=log_path)
        served.wait_ready()
        return served

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"deltamux serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"deltamux serve was not ready within {WAIT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self) -> int:
        return self.process.wait(timeout=WAIT_S)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT_S)


@dataclass
class _Stream:
    """One streaming completion read on its own thread, each data line stamped with its arrival time."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    status: int | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return bool(self.lines) and self.lines[-1][1] == "data: [DONE]"

    def chunks(self) -> list[dict]:
        return [json.loads(line[len("data: ") :]) for _, line in self.lines if line != "data: [DONE]"]


def _read_stream(url: str, body: dict, stream: _Stream) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=WAIT_S) as response:
            stream.status = response.status_code
            for line in response.iter_lines():
                if line:
                    stream.lines.append((time.monotonic(), line))
    except httpx.HTTPError as e:
        stream.error = e


@pytest.fixture
def store(tmp_path: Path, delta_files: dict[str, Path]) -> Path:
    folder = tmp_path / "store"
    folder.mkdir()
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], folder / delta_files[task].name)
    return folder


def _start_streams(url: str, *, count: int, max_tokens: int) -> tuple[list[_Stream], list[threading.Thread]]:
    streams, threads = [], []
    models = [BASE_ID, "alpha", "beta"]
    for i in range(count):
        body = {
            "model": models[i % len(models)], "prompt": "The quick brown fox", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
        }
        stream = _Stream()
        thread = threading.Thread(target=_read_stream, args=(url, body, stream), daemon=True)
        thread.start()
        streams.append(stream)
        threads.append(thread)
    return streams, threads


def _wait_first_text(streams: list[_Stream], *, all_connected: bool = False) -> None:
    """Wait until one stream has text; with `all_connected`, also until every stream got its headers.

    The server sends a stream's headers with its first token, so `all_connected` waits until the
    last stream has started. A stream that connects after the signal would meet a closed socket.
    """
    deadline = time.monotonic() + WAIT_S
    while not any(len(s.lines) >= 2 for s in streams) or (all_connected and any(s.status is None for s in streams)):
        if time.monotonic() > deadline:
            raise AssertionError("no stream produced text, or not every stream connected")
        time.sleep(0.01)


def test_sigterm_finishes_in_flight_and_exits_zero(tiny_base, store, tmp_path) -> None:
    served = ServeProcess.start(
        base=tiny_base, store=store, log_path=tmp_path / "serve.log",
        extra=["--max-batch-size", "1", "--shutdown-timeout", "120", "--time-slice", "0.01"],
    )
    try:
        # 1. Eight streams, served one at a time (batch size 1), so most are queued at SIGTERM.
        streams, threads = _start_streams(served.base_url, count=8, max_tokens=100)
        _wait_first_text(streams, all_connected=True)
        served.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # 2. New work is turned away: the listening socket is closed, or the request gets 503.
        try:
            late = httpx.post(f"{served.base_url}/v1/completions", json={"model": BASE_ID, "prompt": "I"}, timeout=10)
            assert late.status_code == 503, late.text
        except httpx.TransportError:
            pass

        # 3. Every in-flight stream still completes in full, and the process exits with 0.
        for thread in threads:
            thread.join(WAIT_S)
        code = served.wait()
    finally:
        served.kill()
    log = served.log()
    assert code == 0, log
    for stream in streams:
        assert stream.error is None, stream.error
        assert stream.status == 200
        assert stream.done
        finishes = [c["choices"][0]["finish_reason"] for c in stream.chunks() if c["choices"]]
        assert finishes[-1] == "length"
    # The drain really waited: some streams were still sending after the signal.
    assert any(s.lines[-1][0] > signalled for s in streams)
    assert RESTORED_LOG in log
    assert "stopped after SIGTERM" in log
    assert "Traceback" not in log


def test_sigterm_past_timeout_cancels_and_exits_zero(tiny_base, store, tmp_path) -> None:
    served = ServeProcess.start(
        base=tiny_base, store=store, log_path=tmp_path / "serve.log",
        extra=["--max-batch-size", "1", "--shutdown-timeout", "0", "--time-slice", "0.01"],
    )
    try:
        # 8 streams of 100 tokens, one at a time: far more work than can finish between the
        # first token and the signal, however fast the machine.
        streams, threads = _start_streams(served.base_url, count=8, max_tokens=100)
        _wait_first_text(streams)
        served.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(WAIT_S)
        code = served.wait()
    finally:
        served.kill()
    log = served.log()
    assert code == 0, log
    # With no time to drain, at least one stream is cut short, yet the base is restored.
    assert not all(stream.done for stream in streams)
    assert RESTORED_LOG in log


def test_repeated_sigterm_still_exits_zero(tiny_base, store, tmp_path) -> None:
    served = ServeProcess.start(base=tiny_base, store=store, log_path=tmp_path / "serve.log")
    try:
        os.kill(served.process.pid, signal.SIGTERM)
        os.kill(served.process.pid, signal.SIGTERM)
        code = served.wait()
    finally:
        served.kill()
    assert code == 0, served.log()
    assert RESTORED_LOG in served.log()
