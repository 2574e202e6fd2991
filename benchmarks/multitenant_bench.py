"""Serving many tasks against one: single task vs N tasks under Zipf, and `exact` vs `full` swaps.

Each configuration runs a fresh `deltamux serve` subprocess on 127.0.0.1 (so the load client
does not share the server's interpreter) and drives it with `deltamux loadtest`'s runner at the
same Poisson rate, with greedy requests that decode exactly --max-tokens tokens each:

- single: every request goes to one task (t0), so the base never switches after the first swap;
- zipf-exact: N tasks under Zipf(S), swap mode exact (sparse apply and restore);
- zipf-full: the same load, swap mode full (whole fine-tuned tensors copied in from CPU memory);
- zipf-mixed: the same load, batching mixed (a batch may hold several tasks, each row adding its
  own delta through sparse products on the base weights).

With --closed-loop USERS the script also runs the three configurations with that many users in a
closed loop, which measures each configuration's capacity rather than its latency at one load.

Deltas: N random DARE-style deltas at drop rate --drop-rate over every attention and MLP
projection of the base, written with deltastore.format.write_delta (float16 values). They measure
speed only: a random delta decodes nonsense but costs what a real one of the same nnz costs.

Usage:
  OMP_NUM_THREADS=1 python benchmarks/multitenant_bench.py --base /work/base1 --rate 0.5 --duration 60 --out runs/mt

The script prints a markdown table of ratios and absolute numbers. Each run's loadtest report
and server log are written to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

from deltastore.checkpoint import Checkpoint, fingerprint
from deltastore.format import SparseEntry, delta_file_name, write_delta
from server.loadtest.mix import parse_mix
from server.loadtest.prompts import Prompt
from server.loadtest.report import summarize, write_report
from server.loadtest.runner import LoadConfig, run_load

logger = logging.getLogger("multitenant_bench")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = (
    "Write a short note to a colleague about the meeting tomorrow.",
    "Summarize the plot of a detective story in two sentences.",
    "List three ways to keep a kitchen clean.",
    "Explain what a hash table is to a new programmer.",
    "Describe the weather on a cold autumn morning.",
    "Give a friendly reply to a customer who lost their receipt.",
)


def write_random_deltas(base: Path, store: Path, *, tasks: list[str], drop_rate: float) -> None:
    """Write one random DARE-style delta per task over the base's projections; skip files that exist."""
    store.mkdir(parents=True, exist_ok=True)
    missing = [task for task in tasks if not (store / delta_file_name(task)).exists()]
    if not missing:
        return
    checkpoint = Checkpoint.open(base)
    base_fingerprint = fingerprint(base)
    names = [n for n in checkpoint.names if n.endswith(".weight") and any(p in n for p in PROJECTIONS)]
    for seed, task in enumerate(missing, start=1):
        generator = torch.Generator().manual_seed(seed)
        entries = {}
        for name in names:
            shape = checkpoint.shape(name)
            numel = 1
            for size in shape:
                numel *= size
            indices = (torch.rand(numel, generator=generator) >= drop_rate).nonzero().view(-1)
            # DARE rescales kept values by 1 / (1 - p); 1e-3 is a typical fine-tuning update size.
            values = torch.randn(indices.numel(), generator=generator) * 1e-3 / (1 - drop_rate)
            entries[name] = SparseEntry(shape=tuple(shape), indices=indices, values=values)
        write_delta(
            store / delta_file_name(task), task=task, base_fingerprint=base_fingerprint, method="dare",
            params={"drop_rate": drop_rate, "seed": seed}, entries=entries,
        )
        logger.info("wrote random delta %s (%d tensors)", task, len(entries))


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    *, base: Path, store: Path, swap_mode: str, batch: int, threads: int, log: Path, batching: str = "per-task",
    timeout: float = 300.0,
) -> ServerProcess:
    """Start `deltamux serve` on a free loopback port and wait until /ready returns 200."""
    port = _free_port()
    # The serve flag may not list every swap mode, so the mode goes through the environment.
    env = {
        **os.environ, "DELTAMUX_SWAP_MODE": swap_mode, "DELTAMUX_BATCHING": batching, "OMP_NUM_THREADS": str(threads),
    }
    command = [
        sys.executable, "-m", "server.cli", "--log-level", "WARNING", "serve", "--base", str(base), "--store", str(store),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--base-name", "base",
        "--max-batch-size", str(batch),
    ]
    handle = log.open("w")
    process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} during start-up; see {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return ServerProcess(process=process, url=url, log=log)
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise TimeoutError(f"the server was not ready within {timeout:.0f} s; see {log}")


def run_config(
    name: str, *, base: Path, store: Path, swap_mode: str, tasks: list[str], mix: str, rate: float | None,
    users: int | None, args: argparse.Namespace, out: Path, batching: str = "per-task",
) -> dict:
    """Serve one configuration, warm every task once, run the load and return the report."""
    server = start_server(
        base=base, store=store, swap_mode=swap_mode, batch=args.batch, threads=args.threads,
        log=out / f"{name}.server.log", batching=batching,
    )
    try:
        # Warm-up: load every delta (and, in full mode, build its full weights) outside the timed run.
        for task in tasks:
            body = {"model": task, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=600).raise_for_status()
        config = LoadConfig(
            url=server.url, mix=parse_mix(mix, tasks), prompts=[Prompt(text=p) for p in PROMPTS],
            duration=args.duration, rate=rate, concurrency=users, max_tokens=args.max_tokens, ignore_eos=True,
            seed=args.seed, progress=False,
        )
        result = run_load(config)
        write_report(result, out / name)
        return summarize(result)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="base model folder (float32 safetensors)")
    parser.add_argument("--store", type=Path, default=Path("/tmp/deltamux-mt-store"), help="folder for the random deltas (reused if present)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the loadtest reports and server logs")
    parser.add_argument("--tasks", type=int, default=8, help="tasks in the multi-task configurations (default: 8)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the multi-task mix (default: 1.1)")
    parser.add_argument("--drop-rate", type=float, default=0.99, help="drop rate of the random deltas (default: 0.99)")
    parser.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second in every configuration")
    parser.add_argument("--closed-loop", type=int, default=0, help="also run each configuration with this many closed-loop users")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per configuration (default: 60)")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request (default: 32)")
    parser.add_argument("--batch", type=int, default=8, help="server max_batch_size (default: 8)")
    parser.add_argument("--only", default="single,zipf-exact,zipf-full,zipf-mixed", help="comma-separated configurations to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of arrivals and task draws (default: 0)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="OMP_NUM_THREADS of the server (default: 1; on a CPU shared with other jobs, more threads than free "
        "cores make torch's thread pool wait on each other)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    tasks = [f"t{i}" for i in range(args.tasks)]
    write_random_deltas(args.base, args.store, tasks=tasks, drop_rate=args.drop_rate)
    args.out.mkdir(parents=True, exist_ok=True)
    configs = {
        "single": dict(swap_mode="exact", tasks=tasks[:1], mix="uniform"),
        "zipf-exact": dict(swap_mode="exact", tasks=tasks, mix=f"zipf:{args.zipf}"),
        "zipf-full": dict(swap_mode="full", tasks=tasks, mix=f"zipf:{args.zipf}"),
        "zipf-mixed": dict(swap_mode="exact", tasks=tasks, mix=f"zipf:{args.zipf}", batching="mixed"),
    }
    selected = [name for name in args.only.split(",") if name]
    loads = [("open", args.rate, None)] + ([("closed", None, args.closed_loop)] if args.closed_loop else [])

    results: dict[str, dict] = {}
    for load, rate, users in loads:
        for name in selected:
            key = f"{load}-{name}"
            logger.info("running %s", key)
            report = run_config(key, base=args.base, store=args.store, rate=rate, users=users, args=args, out=args.out, **configs[name])
            results[key] = report
            overall = report["summary"]["overall"]
            logger.info("%s: %.1f tokens/s, ttft p99 %.3f s, swaps %s, errors %s", key, overall["tokens_per_s"] or 0,
                        overall["ttft"]["p99"] or 0, (report["server"] or {}).get("swaps"), overall["errors"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, args)

CONFIG_ORDER = ("single", "zipf-exact", "zipf-full", "zipf-mixed")


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    hardware = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"\n{datetime.now(UTC).date()}, {hardware}; base {args.base}, {args.tasks} tasks, drop rate {args.drop_rate}, "
          f"max_tokens {args.max_tokens}, batch {args.batch}, duration {args.duration:g} s, server threads {args.threads}\n")
    for load in ("open", "closed"):
        single = results.get(f"{load}-single")
        rows = [(name, results[f"{load}-{name}"]) for name in CONFIG_ORDER if f"{load}-{name}" in results]
        if not rows:
            continue
        label = f"Poisson {args.rate:g} req/s" if load == "open" else f"{args.closed_loop} closed-loop users"
        print(f"{label}:\n")
        print("| config | tokens/s / single | ttft p99 / single | tokens/s | ttft p50 (s) | ttft p99 (s) | e2e p99 (s) | itl p50 (ms) | swaps | errors |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for name, report in rows:
            s = report["summary"]["overall"]
            tput = s["tokens_per_s"] or 0.0
            ratio = tput / single["summary"]["overall"]["tokens_per_s"] if single else float("nan")
            ttft_ratio = s["ttft"]["p99"] / single["summary"]["overall"]["ttft"]["p99"] if single else float("nan")
            swaps = (report["server"] or {}).get("swaps", "-")
            print(f"| {name} | {ratio:.2f} | {ttft_ratio:.2f} | {tput:.1f} | {s['ttft']['p50']:.3f} | {s['ttft']['p99']:.3f} | "
                  f"{s['latency']['p99']:.3f} | {s['itl']['p50'] * 1e3:.1f} | {swaps} | {s['errors'] or '-'} |")
        print()


if __name__ == "__main__":
    main()
