"""Swap count and swap time per stage while requests alternate between tasks.

The server runs in-process (see serve_bench.py). Requests are sent one at a time, cycling over
the tasks and the base, so every request forces a swap. Each configuration runs in a fresh
server and reads the `deltamux_swap_stage_seconds` histogram afterwards:

- warm: the default cache budgets, so after the first round every delta comes from the device tier;
- cold: a device cache of 0 bytes, so every swap decodes the delta again. On CUDA the CPU tier
  then provides the verified file. On CPU that tier is off, so the file is read from disk.
- full (with `--modes exact,full`): the `full` baseline, which copies each task's whole
  fine-tuned tensors in from CPU memory; its first round builds them and is not timed apart.

Each configuration also reports its wall time, so the requests per second of a swap-bound load
compare the modes end to end.

Usage:
  python benchmarks/swap_bench.py --tiny
  python benchmarks/swap_bench.py --base DIR --store DIR --tasks a,b [--device cuda] [--modes exact,full]
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path

import openai
import torch

from server.metrics import SWAP_STAGES
from server.settings import Settings
from serve_bench import build_tiny, start_server  # the sibling script; run this file from any folder


def run_config(settings: Settings, *, models: list[str], requests: int) -> dict:
    """Send `requests` alternating 1-token completions; return swap count and per-stage seconds."""
    server = start_server(settings)
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=3600)
        start = time.perf_counter()
        for i in range(requests):
            client.completions.create(model=models[i % len(models)], prompt="The quick brown fox", max_tokens=1, temperature=0)
        seconds = time.perf_counter() - start
        runtime = server.app.state.runtime
        registry = runtime.metrics.registry
        stages = {}
        for stage in SWAP_STAGES:
            count = registry.get_sample_value("deltamux_swap_stage_seconds_count", {"stage": stage}) or 0.0
            total = registry.get_sample_value("deltamux_swap_stage_seconds_sum", {"stage": stage}) or 0.0
            stages[stage] = (int(count), total)
        nnz = {entry.task: entry.metadata.nnz for entry in runtime.store.tasks()}
        return {
            "swaps": runtime.engine.swap_count, "stages": stages, "placement": runtime.placement, "nnz": nnz,
            "seconds": seconds,
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="build the tiny test model and two deltas in a temporary folder")
    parser.add_argument("--base", type=Path, help="base model folder")
    parser.add_argument("--store", type=Path, help="delta store folder")
    parser.add_argument("--tasks", default="alpha,beta", help="comma-separated tasks to alternate with the base (default: alpha,beta)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="model device (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weight dtype (default: auto)")
    parser.add_argument("--requests", type=int, default=60, help="requests per configuration (default: 60)")
    parser.add_argument("--modes", default="exact", help="comma-separated swap modes: exact, subtract, full (default: exact)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tasks = [t for t in args.tasks.split(",") if t]

    with tempfile.TemporaryDirectory(prefix="swap-bench-") as scratch:
        if args.tiny:
            base, store = build_tiny(Path(scratch), tasks=tuple(tasks))
        elif args.base is None or args.store is None:
            parser.error("pass --tiny, or both --base and --store")
        else:
            base, store = args.base, args.store
        common = dict(base=base, store=store, device=args.device, dtype=args.dtype, base_name="base")
        configs = {
            "warm": Settings(**common),
            "cold": Settings(**common, device_cache_bytes=0),
        }
        for mode in [m for m in args.modes.split(",") if m and m != "exact"]:
            configs[mode] = Settings(**common, swap_mode=mode)
        results = {name: run_config(s, models=[*tasks, "base"], requests=args.requests) for name, s in configs.items()}

    placement = results["warm"]["placement"]
    hardware = torch.cuda.get_device_name() if placement.device.type == "cuda" else f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"base {'tiny test model' if args.tiny else base}, device {placement.device}, dtype {placement.dtype}, {hardware}")
    print(f"{args.requests} requests cycling over {tasks + ['base']}; nnz per task: {results['warm']['nnz']}\n")
    print("| config | swaps | requests/s | stage | count | mean ms | total ms |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for name, result in results.items():
        rate = args.requests / result["seconds"]
        for stage, (count, total) in result["stages"].items():
            mean = total / count * 1e3 if count else 0.0
            print(f"| {name} | {result['swaps']} | {rate:.2f} | {stage} | {count} | {mean:.2f} | {total * 1e3:.1f} |")


if __name__ == "__main__":
    main()
