"""Cost of a mixed-task batch against a batch of one task on merged weights, in one process.

A batch of `--batch` rows is generated with the server's `generate` three ways, alternating in
rounds so that all see the same machine state:

- merged: every row belongs to one task whose delta is merged into the weights (the per-task path);
- mixed-K: the rows are spread over K tasks (K = 1, 2, 4, ... up to --batch), the weights are the
  base's and `server.mixing.MixedBatch` adds each row's delta with sparse products;
- per-task-K: the same K-task rows served the per-task way, one batch per task with a swap
  (restore and apply) before each, which is what batching per task costs.

Throughput is generated tokens per second over the whole batch, swaps included. Ratios are
against `merged`. Deltas are random DARE-style deltas at `--drop-rate` over every attention and
MLP projection (benchmarks/multitenant_bench.py writes them), so they cost what real ones of the
same nnz cost.

With --tasks, the named deltas already in --store are used instead (for example the demo
deltas), and K goes up to their number.

Usage:
  OMP_NUM_THREADS=1 python benchmarks/mixed_bench.py --base /work/base1 --batch 8 --max-tokens 32
  OMP_NUM_THREADS=1 python benchmarks/mixed_bench.py --base ~/.cache/deltamux/SmolLM2-135M-Instruct \
      --store demo/store --tasks sentiment,arithmetic,instruct --counts 1,3
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multitenant_bench import PROMPTS, write_random_deltas  # noqa: E402

from deltastore.apply import apply, decode, model_params, pack_parameters, prepare_merged, restore  # noqa: E402
from deltastore.format import delta_file_name, read_delta  # noqa: E402
from server.generation import SamplingParams, SequenceInput, generate  # noqa: E402
from server.mixing import MixedBatch, prepare  # noqa: E402

logger = logging.getLogger("mixed_bench")


def _sequences(tokenizer, rows: int, max_tokens: int) -> list[SequenceInput]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [SequenceInput(prompt_ids=tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids, params=params) for i in range(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="base model folder")
    parser.add_argument("--store", type=Path, default=Path("/tmp/deltamux-mt-store"), help="folder for the random deltas (reused)")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per row (default: 32)")
    parser.add_argument("--drop-rate", type=float, default=0.99, help="drop rate of the random deltas (default: 0.99)")
    parser.add_argument("--counts", default="1,2,4,8", help="comma-separated task counts K to mix (default: 1,2,4,8)")
    parser.add_argument("--tasks", default="", help="comma-separated tasks whose deltas are in --store (default: write random ones)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration; the median is reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.tasks:
        tasks = [task for task in args.tasks.split(",") if task]
    else:
        tasks = [f"t{i}" for i in range(args.batch)]
        write_random_deltas(args.base, args.store, tasks=tasks, drop_rate=args.drop_rate)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    pack_parameters(model_params(model))  # as the server keeps its weights
    params = model_params(model)
    eos = frozenset({tokenizer.eos_token_id})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decoded = {task: decode(read_delta(args.store / delta_file_name(task))) for task in tasks}
    for delta in decoded.values():
        prepare_merged(params, delta)
    prepared = {task: prepare(model, decoded[task]) for task in tasks}

    def run(sequences: list[SequenceInput]) -> None:
        generate(model, tokenizer, sequences, eos_token_ids=eos, pad_token_id=pad)

    def merged() -> None:
        applied = apply(params, decoded[tasks[0]])
        try:
            run(_sequences(tokenizer, args.batch, args.max_tokens))
        finally:
            restore(params, applied)

    def mixed(k: int) -> None:
        row_deltas = [prepared[tasks[row % k]] for row in range(args.batch)]
        sequences = _sequences(tokenizer, args.batch, args.max_tokens)
        with MixedBatch(model, row_deltas) as mixing:
            generate(model, tokenizer, sequences, eos_token_ids=eos, pad_token_id=pad, on_rows=mixing.set_active)

    def per_task(k: int) -> None:
        for i in range(k):
            rows = len(range(i, args.batch, k))
            applied = apply(params, decoded[tasks[i]])
            try:
                run(_sequences(tokenizer, rows, args.max_tokens))
            finally:
                restore(params, applied)

    counts = [int(k) for k in args.counts.split(",") if k and int(k) <= min(args.batch, len(tasks))]
    configs = {"merged": merged}
    for k in counts:
        configs[f"mixed-{k}"] = lambda k=k: mixed(k)
        configs[f"per-task-{k}"] = lambda k=k: per_task(k)

    merged()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        for name, run_config in configs.items():
            start = time.perf_counter()
            run_config()
            seconds[name].append(time.perf_counter() - start)
        logger.info("round %d of %d done", round_index + 1, args.rounds)

    tokens = args.batch * args.max_tokens
    reference = statistics.median(seconds["merged"])
    print(f"\n{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.max_tokens} tokens per row, "
          f"deltas {args.tasks or f'random, p = {args.drop_rate}'}, median of {args.rounds}\n")
    print("| config | tokens/s / merged | tokens/s | seconds |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {reference / median:.2f} | {tokens / median:.1f} | {median:.2f} |")


if __name__ == "__main__":
    main()
