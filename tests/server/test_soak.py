"""Soak: 1,000 cycles of register, load, evict and delete leave memory, files and threads flat.

Each cycle uploads the delta of task `gamma` (a new version every time) and serves one token from
it, which loads it into both cache tiers and applies it. It then serves one token from the base,
which restores the base, evicts the task explicitly and deletes it. RSS is sampled every SAMPLE_EVERY
cycles, after a garbage collection, and printed so the curve can be recorded (run with -s). On
CUDA the allocated device memory is sampled as well.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest
import torch

from deltastore.apply import model_params
from server.settings import Settings
from tests.server.conftest import BASE_ID
from tests.server.support import start_server, weights_hash

CYCLES = 1000
SAMPLE_EVERY = 100
WARMUP_CYCLES = 100  # allocator pools and caches settle in the first cycles; growth counts from here
RSS_BOUND_BYTES = 8 << 20  # allowed RSS growth from the warm-up sample to the last one
DEVICE_BOUND_BYTES = 1 << 20  # allowed growth of allocated CUDA memory over the same span
FD_BOUND = 4  # allowed growth of open file descriptors over the same span


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS is missing from /proc/self/status")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_register_load_evict_delete_soak(
    tiny_base: Path, delta_files: dict[str, Path], tmp_path: Path, device: str, caplog: pytest.LogCaptureFixture
) -> None:
    # pytest keeps every captured log record in memory; at INFO (which an earlier in-process CLI test
    # may have set on the root logger) that alone grows RSS by about 20 KiB per cycle.
    caplog.set_level(logging.WARNING)
    for name in ("server", "deltastore", "httpx", "uvicorn", "uvicorn.access", "uvicorn.error"):
        caplog.set_level(logging.WARNING, logger=name)
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(delta_files["alpha"], store / delta_files["alpha"].name)
    settings = Settings(base=tiny_base, store=store, device=device, base_name=BASE_ID, time_slice=0.01, max_batch_wait=0)
    server = start_server(settings)
    runtime = server.runtime
    data = delta_files["gamma"].read_bytes()
    # The file's metadata names task gamma, so it is registered under that name every cycle.
    task = "gamma"
    base_hash = weights_hash(runtime.engine.params)
    samples: list[tuple[int, int, int, int, int]] = []  # (cycle, rss bytes, open fds, threads, CUDA bytes)

    def one_token(model: str, client: httpx.Client) -> None:
        body = {"model": model, "prompt": "I", "max_tokens": 1, "temperature": 0}
        response = client.post(f"{server.base_url}/v1/completions", json=body)
        assert response.status_code == 200, response.text

    try:
        with httpx.Client(timeout=60) as client:
            for cycle in range(CYCLES + 1):
                if cycle % SAMPLE_EVERY == 0:
                    gc.collect()
                    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
                    samples.append((cycle, _rss_bytes(), _open_fds(), threading.active_count(), allocated))
                if cycle == CYCLES:
                    break
                uploaded = client.post(
                    f"{server.base_url}/v1/deltas", params={"task": task}, content=data,
                    headers={"content-type": "application/octet-stream"},
                )
                assert uploaded.status_code == 201, uploaded.text
                one_token(task, client)
                one_token(BASE_ID, client)
                runtime.residency.evict(task)
                deleted = client.delete(f"{server.base_url}/v1/deltas/{task}")
                assert deleted.status_code == 200, deleted.text
        resident = (runtime.residency.resident("device"), runtime.residency.resident("cpu"))
        swaps = runtime.engine.swap_count
        final_hash = weights_hash(model_params(runtime.model))
    finally:
        server.stop()

    for cycle, rss, fds, threads, allocated in samples:
        print(
            f"soak {device} cycle {cycle:5d}: rss {rss / 2**20:8.1f} MiB, open fds {fds}, threads {threads}, "
            f"cuda allocated {allocated / 2**20:.1f} MiB"
        )
    warm = next(s for s in samples if s[0] == WARMUP_CYCLES)
    last = samples[-1]
    assert last[1] - warm[1] <= RSS_BOUND_BYTES, samples
    assert last[2] - warm[2] <= FD_BOUND, samples
    assert last[3] <= warm[3], samples
    assert last[4] - warm[4] <= DEVICE_BOUND_BYTES, samples
    assert sorted(path.name for path in store.iterdir()) == ["alpha.delta.safetensors"]
    assert resident == ([], [])
    assert swaps >= 2 * CYCLES
    assert final_hash == base_hash
