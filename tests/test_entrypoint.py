"""docker/entrypoint.sh: the script the container and `make demo` both run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tinymodel import save_tiny_base

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DELTAMUX = Path(sys.executable).parent / "deltamux"


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("DELTAMUX_")}
    full_env.update({"DELTAMUX_BIN": str(DELTAMUX), **env})
    return subprocess.run([str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tiny_finetunes: dict[str, Path]) -> Path:
    """A store with one DARE delta of `tiny_base`, written by `deltamux compress`."""
    store = tmp_path_factory.mktemp("tiny-store")
    command = [
        str(DELTAMUX), "compress", "--base", str(tiny_base), "--finetuned", str(tiny_finetunes["alpha"]),
        "--task", "alpha", "--store", str(store), "--method", "dare", "--drop-rate", "0.9",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return store


def test_entrypoint_requires_store_setting() -> None:
    result = _run({})
    assert result.returncode != 0
    assert "DELTAMUX_STORE" in result.stderr


def test_entrypoint_rejects_missing_store(tmp_path: Path) -> None:
    result = _run({"DELTAMUX_STORE": str(tmp_path / "absent")})
    assert result.returncode == 2
    assert "absent" in result.stderr
    assert "does not exist" in result.stderr


def test_entrypoint_rejects_empty_store(tmp_path: Path) -> None:
    result = _run({"DELTAMUX_STORE": str(tmp_path)})
    assert result.returncode == 2
    assert str(tmp_path) in result.stderr
    assert "contains no delta files" in result.stderr
    assert "DELTAMUX_ALLOW_EMPTY_STORE=1" in result.stderr


def test_entrypoint_rejects_missing_base(tmp_path: Path, tiny_store: Path) -> None:
    result = _run({"DELTAMUX_STORE": str(tiny_store), "DELTAMUX_BASE": str(tmp_path / "no-base")})
    assert result.returncode == 2
    assert "no-base" in result.stderr


def test_entrypoint_rejects_delta_for_other_base(tmp_path: Path, tiny_store: Path) -> None:
    other_base = save_tiny_base(tmp_path / "other-base", seed=7)
    result = _run({"DELTAMUX_STORE": str(tiny_store), "DELTAMUX_BASE": str(other_base)})
    assert result.returncode == 1
    assert "alpha.delta.safetensors' was made for base" in result.stderr
    assert "failed verification against base" in result.stderr
    assert str(other_base) in result.stderr


def test_entrypoint_skips_verification_when_disabled(tmp_path: Path, tiny_store: Path) -> None:
    other_base = save_tiny_base(tmp_path / "other-base", seed=7)
    env = {"DELTAMUX_STORE": str(tiny_store), "DELTAMUX_BASE": str(other_base), "DELTAMUX_VERIFY_STORE": "0"}
    result = _run(env, "--port", "not-a-port")
    assert result.returncode == 2
    assert "failed verification" not in result.stderr
    assert "not-a-port" in result.stderr


def test_entrypoint_passes_bad_serve_flag_through(tmp_path: Path, tiny_base: Path) -> None:
    env = {"DELTAMUX_STORE": str(tmp_path), "DELTAMUX_BASE": str(tiny_base), "DELTAMUX_ALLOW_EMPTY_STORE": "1"}
    result = _run(env, "--port", "not-a-port")
    assert result.returncode == 2
    assert "not-a-port" in result.stderr


@pytest.mark.skipif(not DELTAMUX.exists(), reason="the deltamux console script is not installed next to this Python")
def test_entrypoint_serves_tiny_store_until_sigterm(tiny_base: Path, tiny_store: Path) -> None:
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("DELTAMUX_")}
    env.update({"DELTAMUX_BIN": str(DELTAMUX), "DELTAMUX_STORE": str(tiny_store), "DELTAMUX_BASE": str(tiny_base), "DELTAMUX_PORT": str(port)})
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
        assert "alpha" in {model["id"] for model in models["data"]}
        assert len(models["data"]) == 2
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
