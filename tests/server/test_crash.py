"""A process killed during registration leaves the store usable: a delta is listed complete or not at all.

Two kinds of crash: a child process that registers through `Store` and dies with `os._exit` at a
named point (deterministic), and a real `deltamux serve` killed with SIGKILL during an upload.
After each crash the folder contains no partial delta file, and the next start-up removes and
reports the leftover temporary files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from deltastore.format import read_delta
from server.store import UPLOAD_PREFIX, Store
from tests.server.conftest import BASE_ID
from tests.server.test_shutdown import REPO, ServeProcess

CRASHED = 137  # the exit status the child uses to say it died at the crash point

# Runs in a child process: register argv[3] as task argv[4] in store argv[2] and die at point argv[5].
_CHILD = r"""
import os, sys
from pathlib import Path

import server.store as store_module
from deltastore.apply import model_params
from deltastore.checkpoint import fingerprint
from server.store import Store
from transformers import AutoModelForCausalLM

base, folder, source, task, point = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(base)
store = Store(Path(folder), base_fingerprint=fingerprint(base), params=model_params(model), reserved=frozenset())
store.scan()
data = Path(source).read_bytes()

def crash(*args, **kwargs):
    os._exit(137)

fd, upload = store.new_upload()
if point == "mid-upload":
    os.write(fd, data[: len(data) // 2])
    os.fsync(fd)
    crash()
os.write(fd, data)
os.fsync(fd)
os.close(fd)
if point == "before-rename":
    store_module.os.replace = crash
elif point == "before-folder-fsync":
    store_module._fsync_folder = crash
store.register(task, upload)
os._exit(0)
"""


def _crash_child(tiny_base: Path, folder: Path, source: Path, task: str, point: str) -> int:
    command = [sys.executable, "-c", _CHILD, str(tiny_base), str(folder), str(source), task, point]
    return subprocess.run(command, cwd=REPO, capture_output=True, timeout=300).returncode


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(UPLOAD_PREFIX))


@pytest.fixture
def params(tiny_base: Path):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from deltastore.apply import model_params  # noqa: PLC0415

    return model_params(AutoModelForCausalLM.from_pretrained(tiny_base))


# Crash point, whether the task is published afterwards, leftover temporary files before the rescan.
CRASH_POINTS = [("mid-upload", False, 1), ("before-rename", False, 1), ("before-folder-fsync", True, 0)]


@pytest.mark.parametrize(("point", "published", "leftovers"), CRASH_POINTS)
def test_crash_point_leaves_store_consistent(
    tiny_base, delta_files, params, tmp_path, point: str, published: bool, leftovers: int
) -> None:
    from deltastore.checkpoint import fingerprint  # noqa: PLC0415

    folder = tmp_path / "store"
    folder.mkdir()
    shutil.copy(delta_files["alpha"], folder / delta_files["alpha"].name)

    code = _crash_child(tiny_base, folder, delta_files["gamma"], "gamma", point)
    assert code == CRASHED

    # 1. Before any rescan: the task's file is complete or absent, never partial.
    target = folder / "gamma.delta.safetensors"
    assert target.exists() == published
    if published:
        assert target.read_bytes() == delta_files["gamma"].read_bytes()
    assert len(_leftovers(folder)) == leftovers

    # 2. The next start-up removes the leftovers, reports them and lists exactly the complete tasks.
    store = Store(folder, base_fingerprint=fingerprint(tiny_base), params=params, reserved=frozenset({BASE_ID}))
    store.scan()
    assert _leftovers(folder) == []
    assert store.leftovers_removed == leftovers
    expected = {"alpha", "gamma"} if published else {"alpha"}
    assert {entry.task for entry in store.tasks()} == expected
    for entry in store.tasks():
        read_delta(entry.path, expected_fingerprint=store.base_fingerprint)


def _slow_upload(url: str, data: bytes, *, chunks: int, sent: list[int], pause: float) -> None:
    """Upload `data` in `chunks` pieces with a pause before each; `sent` counts the pieces sent."""
    size = -(-len(data) // chunks)

    def body():
        for i in range(chunks):
            time.sleep(pause)
            yield data[i * size : (i + 1) * size]
            sent.append(i)

    try:
        httpx.post(
            f"{url}/v1/deltas", params={"task": "gamma"}, content=body(),
            headers={"content-type": "application/octet-stream"}, timeout=120,
        )
    except httpx.TransportError:
        pass  # the server was killed mid-request


@pytest.mark.slow
def test_sigkill_during_upload_leaves_store_consistent(tiny_base, delta_files, tmp_path) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    shutil.copy(delta_files["alpha"], folder / delta_files["alpha"].name)
    data = delta_files["gamma"].read_bytes()
    chunks = 8

    # Kill after 3 of 8 pieces (the body is half sent) and after all 8 (the server may be verifying).
    for round_number, kill_after in enumerate((3, chunks)):
        served = ServeProcess.start(base=tiny_base, store=folder, log_path=tmp_path / f"serve-{round_number}.log")
        sent: list[int] = []
        uploader = threading.Thread(
            target=_slow_upload, args=(served.base_url, data), kwargs={"chunks": chunks, "sent": sent, "pause": 0.05},
            daemon=True,
        )
        uploader.start()
        deadline = time.monotonic() + 60
        while len(sent) < kill_after and time.monotonic() < deadline:
            time.sleep(0.005)
        served.process.kill()
        served.process.wait(timeout=60)
        uploader.join(60)

        # The task's file is byte-identical to the upload or absent; any leftover is a hidden temporary file.
        target = folder / "gamma.delta.safetensors"
        if target.exists():
            assert target.read_bytes() == data
            target.unlink()
        assert {path.name for path in folder.iterdir() if not path.name.startswith(UPLOAD_PREFIX)} == {
            "alpha.delta.safetensors"
        }
        if round_number == 0:
            # Killed mid-body: the upload's temporary file is still there, and the next start reports it.
            assert len(_leftovers(folder)) == 1
        else:
            assert "removed 1 unfinished upload from" in (tmp_path / "serve-1.log").read_text()

    # A last start-up cleans the folder, reports what it removed and serves the surviving task.
    leftovers = len(_leftovers(folder))
    served = ServeProcess.start(base=tiny_base, store=folder, log_path=tmp_path / "serve-final.log")
    try:
        models = {m["id"] for m in httpx.get(f"{served.base_url}/v1/models").json()["data"]}
        assert models == {BASE_ID, "alpha"}
        body = {"model": "alpha", "prompt": "I", "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{served.base_url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        served.process.terminate()
        served.wait()
    assert _leftovers(folder) == []
    if leftovers:
        noun = "upload" if leftovers == 1 else "uploads"
        assert f"removed {leftovers} unfinished {noun} from" in served.log()
