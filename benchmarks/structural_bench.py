"""Time apply + restore of structural (rows, columns) deltas against unstructured ones at equal drop rates.

For each drop rate the script builds three random deltas over every attention and MLP projection
of the base: the real checkpoint with --base, else random tensors of SmolLM2-135M's shapes. They
keep single entries, whole rows or whole columns, each with probability 1 - p, so all three keep
about the same number of values. It reports
the median time of one exact-mode apply + restore of each, and the decoded size on the device.
The weights are packed into one buffer first, as the server holds them (`pack_parameters`), so
single entries take the one-gather path and rows and columns their per-tensor line updates.

Usage: python benchmarks/structural_bench.py [--base DIR] [--dtype float32|bfloat16|float16]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform

import torch

from apply_bench import load_params, median_seconds, random_delta
from deltastore.apply import DecodedDelta, DecodedTensor, apply, pack_parameters, restore


def random_lines(params: dict[str, torch.Tensor], drop_rate: float, *, axis: int, seed: int = 0) -> DecodedDelta:
    """Return a delta that keeps each row (axis 0) or column (axis 1) with probability 1 - drop_rate."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for name, weight in params.items():
        keep = torch.rand(weight.shape[axis], generator=generator) >= drop_rate
        lines = keep.nonzero().view(-1)
        shape = (lines.numel(), weight.shape[1]) if axis == 0 else (weight.shape[0], lines.numel())
        values = torch.randn(shape, generator=generator) * 1e-3 / (1 - drop_rate)
        tensors.append(DecodedTensor(name=name, indices=lines, values=values, axis=axis))
    nnz = sum(t.values.numel() for t in tensors)
    return DecodedDelta(task=f"lines{axis}-p{drop_rate}", tensors=tensors, device=torch.device("cpu"), nnz=nnz)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base checkpoint folder (default: random tensors of SmolLM2-135M's shapes)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: bfloat16)")
    parser.add_argument("--drop-rates", default="0.9,0.99", help="comma-separated drop rates (default: 0.9,0.99)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement; the median is reported (default: 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params = load_params(args.base, getattr(torch, args.dtype))
    pack_parameters(params)
    weight_bytes = sum(w.numel() * w.element_size() for w in params.values())
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; weights {args.dtype}, "
          f"{weight_bytes / 1e6:.1f} MB of projections ({'checkpoint ' + args.base if args.base else 'random, SmolLM2-135M shapes'})\n")
    print("| drop rate | layout | nnz | decoded MB | exact apply+restore (ms) | x unstructured |")
    print("| --- | --- | --- | --- | --- | --- |")
    for drop_rate in (float(p) for p in args.drop_rates.split(",")):
        deltas = {
            "entries": random_delta(params, drop_rate),
            "rows": random_lines(params, drop_rate, axis=0),
            "columns": random_lines(params, drop_rate, axis=1),
        }
        baseline = None
        for layout, delta in deltas.items():
            restore(params, apply(params, delta))  # builds the packed positions once, as a server load does
            seconds = median_seconds(lambda: restore(params, apply(params, delta)), args.repeats)
            baseline = baseline or seconds
            print(f"| {drop_rate} | {layout} | {delta.nnz:,} | {delta.nbytes / 1e6:.1f} | {seconds * 1e3:.2f} | {seconds / baseline:.2f} |")


if __name__ == "__main__":
    main()
