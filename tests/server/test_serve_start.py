"""`deltamux serve` fails fast, with one clear line, on a wrong base folder or a port in use."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _serve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "server.cli", "serve", "--device", "cpu", "--host", "127.0.0.1", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_missing_base_fails_without_traceback(tmp_path: Path) -> None:
    result = _serve("--base", str(tmp_path / "no-base"), "--store", str(tmp_path / "store"), "--port", "0")
    assert result.returncode == 2
    assert "no-base" in result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_fails_before_loading(tmp_path: Path, tiny_base: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("--base", str(tiny_base), "--store", str(tmp_path / "store"), "--port", str(port))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "choose another --port" in result.stderr
    assert "ready: serving" not in result.stderr  # the model never loaded
    assert "Traceback" not in result.stderr
