"""The committed demo deltas: readable, small enough, and self-describing, checked without the real base."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from deltastore.format import DeltaFile, delta_file_name, read_delta

ROOT = Path(__file__).resolve().parents[1]
DEMO_STORE = ROOT / "demo" / "store"
DEMO_TASKS = ("sentiment", "arithmetic", "instruct")
METHODS = ("dare", "darex-q", "magnitude", "wanda")
# A demo delta may take at most 1/50 of the base checkpoint stored in bf16 (2 bytes per weight).
MAX_FRACTION_OF_BF16 = 1 / 50
BF16_BYTES = 2


def _delta_path(task: str) -> Path:
    path = DEMO_STORE / delta_file_name(task)
    if not path.is_file():
        pytest.fail(f"missing demo delta {path}; rebuild it with benchmarks/rebuild_demo.sh")
    return path


@functools.cache
def _read(task: str) -> DeltaFile:
    """Read and checksum each demo delta once per session."""
    return read_delta(_delta_path(task))


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_demo_delta_reads(task: str) -> None:
    delta = _read(task)

    assert delta.metadata.task == task
    assert delta.metadata.nnz > 0
    assert len(delta.entries) > 0


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_demo_delta_under_size_limit(task: str) -> None:
    path = _delta_path(task)
    metadata = _read(task).metadata
    base_numel = metadata.extra.get("base_numel")

    assert isinstance(base_numel, int)
    assert base_numel > 0
    assert path.stat().st_size <= MAX_FRACTION_OF_BF16 * BF16_BYTES * base_numel


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_demo_delta_records_method(task: str) -> None:
    metadata = _read(task).metadata

    assert metadata.method in METHODS
    assert metadata.params["method"] == metadata.method
    assert metadata.params["drop_rate"] >= 0.99


def test_demo_deltas_share_one_base() -> None:
    fingerprints = {_read(task).metadata.base_fingerprint for task in DEMO_TASKS}

    assert len(fingerprints) == 1
    assert next(iter(fingerprints)).startswith("sha256:")
