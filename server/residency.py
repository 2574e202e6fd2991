"""Cache tiers for task deltas between uses: the model's device, CPU memory, then disk.

- device tier: `DecodedDelta`s (int64 indices, float32 values) on the model's device, ready for
  `apply`; least recently used first out when over `device_cache_bytes`;
- CPU tier: verified `DeltaFile`s in CPU memory under `cpu_cache_bytes`, so a delta evicted from
  the device skips the disk read and checksum when it comes back;
- disk: the store's file, read and verified in full on a miss of both tiers.

When the model runs on the CPU the device tier already lives in CPU memory, so the CPU tier is
switched off rather than holding a second copy.

The `full` swap mode is a baseline: it keeps each task's whole fine-tuned tensors (base + delta
for every tensor the delta touches, dense, in the weight dtype) in CPU memory, plus one CPU copy
of those base tensors, and copies them in and out on every switch. `fetch_full` builds them once
per task from the decoded delta.

Entries are keyed by (task, version): a task deleted and registered again never hits an old entry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from deltastore.apply import DecodedDelta, apply, decode, prepare_merged
from deltastore.format import DeltaFile
from server.metrics import STAGE_COPY_TO_DEVICE, STAGE_DISK_LOAD, Metrics
from server.store import Store, StoredTask

logger = logging.getLogger(__name__)

TIER_DEVICE = "device"
TIER_CPU = "cpu"
TIER_FULL = "full"  # whole fine-tuned tensors of the `full` baseline, in CPU memory


@dataclass(frozen=True)
class Fetched:
    """A decoded delta and what it cost to get it (0 for stages a cache hit skipped)."""

    decoded: DecodedDelta
    tier: str  # where it was found: device, cpu or disk
    disk_load_s: float
    copy_s: float


@dataclass(frozen=True)
class FullWeights:
    """A task's fine-tuned tensors of the `full` baseline: base + delta, dense, in the weight dtype, on CPU."""

    task: str
    tensors: dict[str, torch.Tensor]
    nbytes: int


@dataclass
class _Tier:
    name: str
    budget: int
    items: OrderedDict[tuple[str, int], tuple[object, int]]  # (task, version) -> (delta, bytes), LRU first
    used: int = 0


def _delta_file_bytes(delta: DeltaFile) -> int:
    total = 0
    for entry in delta.entries.values():
        total += entry.values.numel() * entry.values.element_size()
        indices = getattr(entry, "indices", None)
        if indices is not None:
            total += indices.numel() * indices.element_size()
    return total


def _pinned_copy(tensor: torch.Tensor, *, device: torch.device) -> torch.Tensor:
    """Copy `tensor` into CPU memory, page-locked when the model is on CUDA so copies in are fast."""
    copy = tensor.to("cpu", copy=True)
    return copy.pin_memory() if device.type == "cuda" else copy


def synchronize(device: torch.device) -> None:
    # CUDA copies and kernels are asynchronous; wait so stage times measure the work itself.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Residency:
    """Two LRU tiers in front of the store; `fetch` is called by the engine thread only."""

    def __init__(
        self, store: Store, *, device: torch.device, device_cache_bytes: int, cpu_cache_bytes: int, metrics: Metrics,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.store = store
        self.params = params  # the resident weights; with them, deltas get their packed-buffer positions on load
        self.device = device
        self.metrics = metrics
        cpu_budget = 0 if device.type == "cpu" else cpu_cache_bytes
        self._device = _Tier(TIER_DEVICE, device_cache_bytes, OrderedDict())
        self._cpu = _Tier(TIER_CPU, cpu_budget, OrderedDict())
        self._lock = threading.Lock()  # `evict` runs on request handler threads
        # The `full` baseline: fine-tuned tensors per (task, version), and the base tensors they replace.
        self._full: dict[tuple[str, int], FullWeights] = {}
        self._full_base: dict[str, torch.Tensor] = {}

    def fetch(self, entry: StoredTask) -> Fetched:
        """Return `entry`'s delta decoded on the model's device, loading it from a lower tier if needed."""
        key = (entry.task, entry.version)

        # 1. Device tier: ready to apply.
        with self._lock:
            hit = self._device.items.get(key)
            if hit is not None:
                self._device.items.move_to_end(key)
        if hit is not None:
            self.metrics.delta_hits.labels(tier=TIER_DEVICE).inc()
            return Fetched(decoded=hit[0], tier=TIER_DEVICE, disk_load_s=0.0, copy_s=0.0)

        # 2. CPU tier, else a full read and verification from disk.
        with self._lock:
            cpu_hit = self._cpu.items.get(key)
            if cpu_hit is not None:
                self._cpu.items.move_to_end(key)
        disk_load_s = 0.0
        if cpu_hit is not None:
            delta: DeltaFile = cpu_hit[0]
            tier = TIER_CPU
            self.metrics.delta_hits.labels(tier=TIER_CPU).inc()
        else:
            start = time.perf_counter()
            delta = self.store.read(entry)
            disk_load_s = time.perf_counter() - start
            tier = "disk"
            self.metrics.observe_stage(STAGE_DISK_LOAD, disk_load_s)
            self._insert(self._cpu, key, delta, _delta_file_bytes(delta))

        # 3. Decode onto the model's device.
        start = time.perf_counter()
        decoded = decode(delta, device=self.device)
        if self.params is not None:
            prepare_merged(self.params, decoded)
        synchronize(self.device)
        copy_s = time.perf_counter() - start
        self.metrics.observe_stage(STAGE_COPY_TO_DEVICE, copy_s)
        self.metrics.delta_loads.labels(tier=TIER_DEVICE).inc()
        self._insert(self._device, key, decoded, decoded.nbytes)
        logger.info(
            "loaded delta %s from %s: nnz %d, %d device bytes, disk %.1f ms, copy %.1f ms",
            entry.task, tier, decoded.nnz, decoded.nbytes, disk_load_s * 1e3, copy_s * 1e3,
        )
        return Fetched(decoded=decoded, tier=tier, disk_load_s=disk_load_s, copy_s=copy_s)

    def fetch_full(self, entry: StoredTask, params: dict[str, torch.Tensor]) -> tuple[FullWeights, bool]:
        """Return `entry`'s whole fine-tuned tensors for the `full` baseline and whether they were cached.

        On a miss the delta is fetched and decoded, and each touched tensor is built as the base
        tensor with the delta applied exactly, so `full` serves the same weights as `exact`.
        `params` are read only for tensors that no task has touched yet, which still hold the base.
        """
        key = (entry.task, entry.version)
        with self._lock:
            hit = self._full.get(key)
        if hit is not None:
            self.metrics.delta_hits.labels(tier=TIER_FULL).inc()
            return hit, True

        decoded = self.fetch(entry).decoded
        tensors: dict[str, torch.Tensor] = {}
        for tensor in decoded.tensors:
            base = self._full_base.get(tensor.name)
            if base is None:
                base = _pinned_copy(params[tensor.name].detach(), device=self.device)
                self._full_base[tensor.name] = base
            work = {tensor.name: base.to(self.device, copy=True)}
            single = DecodedDelta(task=decoded.task, tensors=[tensor], device=decoded.device, nnz=0)
            apply(work, single, mode="exact")  # the record is dropped: the base copy restores this tensor
            tensors[tensor.name] = _pinned_copy(work[tensor.name], device=self.device)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        full = FullWeights(task=entry.task, tensors=tensors, nbytes=nbytes)

        # NOTE: the full tier has no byte budget, as the naive way it models keeps every task's
        # weights; 8 tasks of SmolLM2-135M's projections take 3.4 GB in float32.
        with self._lock:
            self._full[key] = full
            used = sum(item.nbytes for item in self._full.values())
        self.metrics.delta_loads.labels(tier=TIER_FULL).inc()
        self.metrics.cache_bytes.labels(tier=TIER_FULL).set(used)
        logger.info("built full weights of task %s: %d tensors, %d bytes in CPU memory", entry.task, len(tensors), nbytes)
        return full, False

    def full_base(self, name: str) -> torch.Tensor:
        """Return the CPU copy of base tensor `name` that `fetch_full` saved before any task replaced it."""
        return self._full_base[name]

    def evict(self, task: str) -> None:
        """Drop every cached version of `task` from all tiers."""
        with self._lock:
            for tier in (self._device, self._cpu):
                for key in [key for key in tier.items if key[0] == task]:
                    self._drop(tier, key, reason="deleted")
            for key in [key for key in self._full if key[0] == task]:
                del self._full[key]
                self.metrics.delta_evictions.labels(tier=TIER_FULL).inc()

    def resident(self, tier_name: str) -> list[str]:
        """Return the tasks held in a tier, least recently used first."""
        tier = self._device if tier_name == TIER_DEVICE else self._cpu
        with self._lock:
            return [task for task, _ in tier.items]

    def _insert(self, tier: _Tier, key: tuple[str, int], delta: object, nbytes: int) -> None:
        if nbytes > tier.budget:
            if tier.budget > 0:
                logger.warning(
                    "delta %s needs %d bytes, more than the whole %s cache (%d bytes); it is not cached",
                    key[0], nbytes, tier.name, tier.budget,
                )
            return
        with self._lock:
            while tier.used + nbytes > tier.budget and tier.items:
                self._drop(tier, next(iter(tier.items)), reason="over budget")
            tier.items[key] = (delta, nbytes)
            tier.used += nbytes
            if tier.name == TIER_CPU:
                self.metrics.delta_loads.labels(tier=TIER_CPU).inc()
            self.metrics.cache_bytes.labels(tier=tier.name).set(tier.used)

    def _drop(self, tier: _Tier, key: tuple[str, int], *, reason: str) -> None:
        # Caller holds the lock. The engine may still hold an evicted delta while it is applied;
        # its memory is freed when the engine restores it.
        delta, nbytes = tier.items.pop(key)
        tier.used -= nbytes
        self.metrics.delta_evictions.labels(tier=tier.name).inc()
        self.metrics.cache_bytes.labels(tier=tier.name).set(tier.used)
        nnz = delta.nnz if isinstance(delta, DecodedDelta) else delta.metadata.nnz
        logger.info("evicted delta %s from the %s cache (%s): nnz %d, %d bytes", key[0], tier.name, reason, nnz, nbytes)
