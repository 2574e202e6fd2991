"""Decode tokens/s of the server with a task's delta applied against the base alone, in one run.

The script starts the server in-process (uvicorn on 127.0.0.1, a free port) and sends
`--batch` concurrent greedy completions per round through the OpenAI client, alternating rounds
between the base and the task so both see the same machine state. Each round starts with one
untimed request that makes the engine swap, so the timed part is decode only. The delta is
merged into the weights, so the goal is a ratio of at least 0.98.

Usage:
  python benchmarks/serve_bench.py --tiny
  python benchmarks/serve_bench.py --base DIR --store DIR --task NAME [--device cuda]

`--tiny` builds the tiny test model and one fine-tune delta in a temporary folder (needs the
repository's tests/ folder). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import torch
import uvicorn

from server.app import create_app
from server.settings import Settings

logger = logging.getLogger("serve_bench")


@dataclass
class Server:
    base_url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def start_server(settings: Settings, *, timeout: float = 600.0) -> Server:
    """Run the app in a background thread on a loopback socket bound here; wait until /ready."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server exited during start-up; see the log")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return Server(base_url=base_url, app=app, server=server, thread=thread)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the server was not ready within {timeout:.0f} s")


def build_tiny(folder: Path, *, tasks: tuple[str, ...] = ("alpha",)) -> tuple[Path, Path]:
    """Write the tiny test base and one DARE delta per task (drop rate 0.9); return (base, store)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from deltastore.compress import compress  # noqa: PLC0415
    from tests.tinymodel import save_finetune, save_tiny_base  # noqa: PLC0415

    base = save_tiny_base(folder / "base")
    store = folder / "store"
    for seed, task in enumerate(tasks, start=1):
        finetune = save_finetune(base, folder / f"ft-{task}", seed=seed)
        compress(base=base, finetuned=finetune, task=task, store=store, method="dare", drop_rate=0.9, seed=seed)
    return base, store


async def timed_round(client: openai.AsyncOpenAI, *, model: str, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    """Swap to `model` (untimed), then time `len(prompts)` concurrent greedy completions; return (tokens, seconds)."""
    await client.completions.create(model=model, prompt=prompts[0], max_tokens=1, temperature=0)
    start = time.perf_counter()
    # ignore_eos makes every request decode exactly max_tokens, so both models do the same work.
    results = await asyncio.gather(
        *(
            client.completions.create(
                model=model, prompt=p, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
            )
            for p in prompts
        )
    )
    seconds = time.perf_counter() - start
    return sum(r.usage.completion_tokens for r in results), seconds


async def measure(base_url: str, *, models: list[str], batch: int, rounds: int, max_tokens: int) -> dict[str, list[float]]:
    prompts = [f"{i} The quick brown fox jumps over the lazy dog." for i in range(batch)]
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=3600)
    rates: dict[str, list[float]] = {model: [] for model in models}
    try:
        for model in models:  # warm-up: first load of each delta, first kernels
            await timed_round(client, model=model, prompts=prompts, max_tokens=4)
        for _ in range(rounds):
            for model in models:
                tokens, seconds = await timed_round(client, model=model, prompts=prompts, max_tokens=max_tokens)
                rates[model].append(tokens / seconds)
    finally:
        await client.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="build the tiny test model and one delta in a temporary folder")
    parser.add_argument("--base", type=Path, help="base model folder")
    parser.add_argument("--store", type=Path, help="delta store folder")
    parser.add_argument("--task", default="alpha", help="task to compare with the base (default: alpha)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="model device (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weight dtype (default: auto)")
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests per round (default: 8)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per model (default: 5)")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (default: 64)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        if args.tiny:
            base, store = build_tiny(Path(scratch), tasks=(args.task,))
        elif args.base is None or args.store is None:
            parser.error("pass --tiny, or both --base and --store")
        else:
            base, store = args.base, args.store
        settings = Settings(
            base=base, store=store, device=args.device, dtype=args.dtype, base_name="base",
            max_batch_size=args.batch, max_batch_wait=0.02,
        )
        server = start_server(settings)
        try:
            placement = server.app.state.runtime.placement
            rates = asyncio.run(
                measure(server.base_url, models=["base", args.task], batch=args.batch, rounds=args.rounds, max_tokens=args.max_tokens)
            )
        finally:
            server.stop()

    # Report the median round of each model and their ratio.
    base_rate = statistics.median(rates["base"])
    task_rate = statistics.median(rates[args.task])
    hardware = torch.cuda.get_device_name() if placement.device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"base {'tiny test model' if args.tiny else base}, device {placement.device}, dtype {placement.dtype}, {hardware}")
    print(f"batch {args.batch}, max_tokens {args.max_tokens}, {args.rounds} rounds per model (median)\n")
    print("| model | decode tokens/s (median) | min | max |")
    print("| --- | ---: | ---: | ---: |")
    for model, values in rates.items():
        print(f"| {model} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
    # Rounds of the two models alternate, so the ratio within each pair cancels slow drifts in load.
    pair_ratios = [task / base for base, task in zip(rates["base"], rates[args.task], strict=True)]
    print(f"\ntask / base: {task_rate / base_rate:.3f} (medians), {statistics.median(pair_ratios):.3f} (median of round pairs)")


if __name__ == "__main__":
    main()
