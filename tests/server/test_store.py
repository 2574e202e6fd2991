"""The delta store folder and the residency tiers, without HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from deltastore.apply import model_params
from deltastore.checkpoint import fingerprint
from deltastore.format import DeltaFormatError
from server.metrics import Metrics
from server.residency import TIER_CPU, TIER_DEVICE, Residency
from server.store import Store, TaskExists, TaskNotFound
from tests.server.conftest import FOREIGN_FINGERPRINT
from tests.server.support import reference_model


@pytest.fixture(scope="module")
def params(tiny_base: Path) -> dict[str, torch.Tensor]:
    return model_params(reference_model(tiny_base, None))


def _store(folder: Path, tiny_base: Path, params) -> Store:
    store = Store(folder, base_fingerprint=fingerprint(tiny_base), params=params, reserved=frozenset({"tiny-base"}))
    store.scan()
    return store


def test_scan_skips_foreign_corrupt_and_misnamed(tmp_path, tiny_base, delta_files, params) -> None:
    shutil.copy(delta_files["alpha"], tmp_path)
    shutil.copy(delta_files["foreign"], tmp_path)
    (tmp_path / "broken.delta.safetensors").write_bytes(b"\x00" * 40)
    shutil.copy(delta_files["beta"], tmp_path / "renamed.delta.safetensors")
    (tmp_path / ".upload-leftover.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a delta")

    store = _store(tmp_path, tiny_base, params)

    assert [entry.task for entry in store.tasks()] == ["alpha"]
    assert not (tmp_path / ".upload-leftover.tmp").exists()
    assert store.total_bytes() == (tmp_path / "alpha.delta.safetensors").stat().st_size
    assert FOREIGN_FINGERPRINT != store.base_fingerprint


def test_get_unknown_or_invalid_name(tmp_path, tiny_base, params) -> None:
    store = _store(tmp_path, tiny_base, params)
    for name in ("missing", "../alpha", "", "tiny-base"):
        with pytest.raises(TaskNotFound):
            store.get(name)


def test_register_publishes_only_verified_file(tmp_path, tiny_base, delta_files, params) -> None:
    store = _store(tmp_path / "store", tiny_base, params)
    fd, upload = store.new_upload()
    with open(fd, "wb") as handle:
        handle.write(delta_files["gamma"].read_bytes())

    entry = store.register("gamma", upload)

    assert entry.path == tmp_path / "store" / "gamma.delta.safetensors"
    assert not upload.exists()
    assert store.get("gamma").version == entry.version
    with pytest.raises(TaskExists):
        store.check_new_name("gamma")
    with pytest.raises(TaskExists):
        store.check_new_name("tiny-base")


def test_register_failure_removes_upload(tmp_path, tiny_base, delta_files, params) -> None:
    store = _store(tmp_path, tiny_base, params)
    fd, upload = store.new_upload()
    with open(fd, "wb") as handle:
        handle.write(delta_files["foreign"].read_bytes())
    with pytest.raises(DeltaFormatError, match="base"):
        store.register("foreign", upload)
    assert not upload.exists()
    assert list(tmp_path.iterdir()) == []


def test_delete_then_register_gets_new_version(tmp_path, tiny_base, delta_files, params) -> None:
    shutil.copy(delta_files["alpha"], tmp_path)
    store = _store(tmp_path, tiny_base, params)
    old = store.get("alpha")
    store.delete("alpha")
    assert not old.path.exists()
    with pytest.raises(TaskNotFound):
        store.delete("alpha")
    fd, upload = store.new_upload()
    with open(fd, "wb") as handle:
        handle.write(delta_files["alpha"].read_bytes())
    assert store.register("alpha", upload).version > old.version


def _residency(store: Store, *, device: str, device_bytes: int, cpu_bytes: int) -> tuple[Residency, Metrics]:
    metrics = Metrics()
    residency = Residency(
        store, device=torch.device(device), device_cache_bytes=device_bytes, cpu_cache_bytes=cpu_bytes, metrics=metrics
    )
    return residency, metrics


def _sample(metrics: Metrics, name: str, tier: str) -> float:
    return metrics.registry.get_sample_value(name, {"tier": tier}) or 0.0


def test_file_copied_in_is_listed(tmp_path, tiny_base, delta_files, params) -> None:
    store = _store(tmp_path, tiny_base, params)
    assert store.tasks() == []

    shutil.copy(delta_files["alpha"], tmp_path)

    assert [entry.task for entry in store.tasks()] == ["alpha"]


def test_file_removed_by_hand_is_unlisted(tmp_path, tiny_base, delta_files, params) -> None:
    shutil.copy(delta_files["alpha"], tmp_path)
    shutil.copy(delta_files["beta"], tmp_path)
    store = _store(tmp_path, tiny_base, params)

    (tmp_path / "beta.delta.safetensors").unlink()

    assert [entry.task for entry in store.tasks()] == ["alpha"]
    with pytest.raises(TaskNotFound):
        store.get("beta")


def test_rescan_keeps_unchanged_versions(tmp_path, tiny_base, delta_files, params) -> None:
    shutil.copy(delta_files["alpha"], tmp_path)
    store = _store(tmp_path, tiny_base, params)
    version = store.get("alpha").version

    shutil.copy(delta_files["beta"], tmp_path)  # changes the folder, so the next listing rescans

    assert [entry.task for entry in store.tasks()] == ["alpha", "beta"]
    assert store.get("alpha").version == version


def test_unservable_file_explains_taken_name(tmp_path, tiny_base, params) -> None:
    store = _store(tmp_path, tiny_base, params)
    (tmp_path / "junk.delta.safetensors").write_text("not a delta file\n")

    with pytest.raises(TaskExists, match="cannot be served") as raised:
        store.check_new_name("junk")
    assert "DELETE /v1/deltas/junk" in str(raised.value)

    assert store.delete("junk") is None
    assert not (tmp_path / "junk.delta.safetensors").exists()
    assert store.check_new_name("junk") == "junk"


def test_delete_missing_task_still_not_found(tmp_path, tiny_base, params) -> None:
    store = _store(tmp_path, tiny_base, params)
    with pytest.raises(TaskNotFound):
        store.delete("absent")


def test_device_tier_lru_eviction(tmp_path, tiny_base, delta_files, params) -> None:
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], tmp_path)
    store = _store(tmp_path, tiny_base, params)
    alpha, beta = store.get("alpha"), store.get("beta")
    one_delta = Residency(store, device=torch.device("cpu"), device_cache_bytes=1 << 30, cpu_cache_bytes=0,
                          metrics=Metrics()).fetch(alpha).decoded.nbytes
    residency, metrics = _residency(store, device="cpu", device_bytes=one_delta + 1, cpu_bytes=1 << 30)

    assert residency.fetch(alpha).tier == "disk"
    assert residency.fetch(alpha).tier == TIER_DEVICE
    assert residency.fetch(beta).tier == "disk"  # evicts alpha: the budget fits one delta
    assert residency.resident(TIER_DEVICE) == ["beta"]
    assert residency.fetch(alpha).tier == "disk"  # on CPU the CPU tier is off, so back to disk

    assert _sample(metrics, "deltamux_delta_hits_total", TIER_DEVICE) == 1
    assert _sample(metrics, "deltamux_delta_evictions_total", TIER_DEVICE) == 2
    assert _sample(metrics, "deltamux_delta_loads_total", TIER_DEVICE) == 3


def test_cpu_tier_serves_device_misses(tmp_path, tiny_base, delta_files, params) -> None:
    # The meta device replaces an accelerator here: decode allocates nothing, but sizes are real.
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], tmp_path)
    store = _store(tmp_path, tiny_base, params)
    alpha, beta = store.get("alpha"), store.get("beta")
    residency, metrics = _residency(store, device="meta", device_bytes=1, cpu_bytes=1 << 30)

    assert residency.fetch(alpha).tier == "disk"  # too big for a 1-byte device budget: not cached
    assert residency.fetch(alpha).tier == TIER_CPU
    assert residency.fetch(beta).tier == "disk"
    assert residency.fetch(beta).tier == TIER_CPU
    assert residency.resident(TIER_CPU) == ["alpha", "beta"]
    assert residency.resident(TIER_DEVICE) == []
    assert _sample(metrics, "deltamux_delta_hits_total", TIER_CPU) == 2

    residency.evict("alpha")
    assert residency.resident(TIER_CPU) == ["beta"]
    assert residency.fetch(alpha).tier == "disk"


def test_reregistered_task_misses_cache(tmp_path, tiny_base, delta_files, params) -> None:
    shutil.copy(delta_files["alpha"], tmp_path)
    store = _store(tmp_path, tiny_base, params)
    residency, _ = _residency(store, device="cpu", device_bytes=1 << 30, cpu_bytes=0)
    residency.fetch(store.get("alpha"))
    store.delete("alpha")
    fd, upload = store.new_upload()
    with open(fd, "wb") as handle:
        handle.write(delta_files["alpha"].read_bytes())
    store.register("alpha", upload)
    # No evict call on purpose: the new version alone must miss the old cache entry.
    assert residency.fetch(store.get("alpha")).tier == "disk"
