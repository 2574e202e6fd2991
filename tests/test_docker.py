"""docker/smoke_check.py: the host-side checks that docker/smoke-test.sh runs against the container."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deltastore.format import FingerprintMismatch, read_delta, read_metadata

ROOT = Path(__file__).resolve().parents[1]
SMOKE_CHECK = ROOT / "docker" / "smoke_check.py"
DEMO_DELTA = ROOT / "demo" / "store" / "sentiment.delta.safetensors"
OTHER_BASE = "sha256:" + "ab" * 32


def _smoke_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SMOKE_CHECK), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_rebase_delta_changes_only_base(tmp_path: Path) -> None:
    copy = tmp_path / "sentiment.delta.safetensors"
    result = _smoke_check("rebase-delta", str(DEMO_DELTA), str(copy), "--fingerprint", OTHER_BASE)
    assert result.returncode == 0, result.stderr

    original = read_metadata(DEMO_DELTA)
    rebased = read_delta(copy)  # verifies the new checksum
    assert rebased.metadata.base_fingerprint == OTHER_BASE
    assert rebased.metadata.task == original.task
    assert rebased.metadata.method == original.method
    assert rebased.metadata.params == original.params
    assert rebased.metadata.nnz == original.nnz
    assert set(rebased.metadata.tensors) == set(original.tensors)


def test_rebase_delta_fails_fingerprint_check(tmp_path: Path) -> None:
    copy = tmp_path / "sentiment.delta.safetensors"
    assert _smoke_check("rebase-delta", str(DEMO_DELTA), str(copy), "--fingerprint", OTHER_BASE).returncode == 0

    original = read_metadata(DEMO_DELTA)
    with pytest.raises(FingerprintMismatch, match=OTHER_BASE):
        read_delta(copy, expected_fingerprint=original.base_fingerprint)


def test_rebase_delta_rejects_same_base(tmp_path: Path) -> None:
    same = read_metadata(DEMO_DELTA).base_fingerprint
    result = _smoke_check("rebase-delta", str(DEMO_DELTA), str(tmp_path / "copy.delta.safetensors"), "--fingerprint", same)
    assert result.returncode != 0
    assert "was already made for base" in result.stderr
    assert not (tmp_path / "copy.delta.safetensors").exists()


def test_complete_reports_unreachable_server() -> None:
    result = _smoke_check("complete", "--url", "http://127.0.0.1:9/v1", "--tasks", "sentiment", "--timeout", "5")
    assert result.returncode == 1
    assert "request to http://127.0.0.1:9/v1 failed: APIConnectionError" in result.stderr
