"""docker/entrypoint.sh: the script the container and `make demo` both run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DELTAMUX = Path(sys.executable).parent / "deltamux"


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("DELTAMUX_")}
    full_env.update({"DELTAMUX_BIN": str(DELTAMUX), **env})
    return subprocess.run([str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True, timeout=120)


def test_entrypoint_requires_store_setting() -> None:
    result = _run({})
    assert result.returncode != 0
    assert "DELTAMUX_STORE" in result.stderr


def test_entrypoint_rejects_missing_store(tmp_path: Path) -> None:
    result = _run({"DELTAMUX_STORE": str(tmp_path / "absent")})
    assert result.returncode == 2
    assert "absent" in result.stderr
    assert "does not exist" in result.stderr


def test_entrypoint_rejects_missing_base(tmp_path: Path) -> None:
    result = _run({"DELTAMUX_STORE": str(tmp_path), "DELTAMUX_BASE": str(tmp_path / "no-base")})
    assert result.returncode == 2
    assert "no-base" in result.stderr


def test_entrypoint_passes_bad_serve_flag_through(tmp_path: Path, tiny_base: Path) -> None:
    result = _run({"DELTAMUX_STORE": str(tmp_path), "DELTAMUX_BASE": str(tiny_base)}, "--port", "not-a-port")
    assert result.returncode == 2
    assert "not-a-port" in result.stderr


@pytest.mark.skipif(not DELTAMUX.exists(), reason="the deltamux console script is not installed next to this Python")
def test_entrypoint_serves_tiny_base_until_sigterm(tmp_path: Path, tiny_base: Path) -> None:
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("DELTAMUX_")}
    env.update({"DELTAMUX_BIN": str(DELTAMUX), "DELTAMUX_STORE": str(tmp_path), "DELTAMUX_BASE": str(tiny_base), "DELTAMUX_PORT": str(port)})
    process = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(0.5)
        assert ready, "the server never reported ready"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert len(models["data"]) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
