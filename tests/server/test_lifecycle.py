"""Start-up checks, loading failures and the /health and /ready split."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from server.settings import Settings
from tests.server.support import start_server


# uvicorn ends its thread with SystemExit when the lifespan fails, which pytest reports as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_missing_base_fails_startup(tmp_path: Path) -> None:
    settings = Settings(base=tmp_path / "nowhere", store=tmp_path / "store", device="cpu")
    with pytest.raises(RuntimeError, match="exited during start-up"):
        start_server(settings, ready_timeout=30)


def test_failed_load_reported_on_health(tiny_base: Path, tmp_path: Path) -> None:
    # A base without its tokenizer passes the start-up checks but fails while loading.
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_base / name, base / name)
    server = start_server(Settings(base=base, store=tmp_path / "store", device="cpu"), wait_path="/health")
    try:
        for _ in range(600):
            health = httpx.get(f"{server.base_url}/health")
            if health.status_code != 200:
                break
        assert health.status_code == 503
        assert "loading the base model failed" in health.json()["error"]["message"]
        assert httpx.get(f"{server.base_url}/ready").status_code == 503
        completion = httpx.post(f"{server.base_url}/v1/completions", json={"model": "base", "prompt": "x"})
        assert completion.status_code == 503
        assert completion.json()["error"]["type"] == "service_unavailable_error"
    finally:
        server.stop()
