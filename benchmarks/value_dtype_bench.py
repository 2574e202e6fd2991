"""Compare the value dtypes of a delta file: bytes per kept value and round-trip error.

Builds DARE-pruned Gaussian deltas (standard deviation --delta-std) over the projections of the
first --layers layers of SmolLM2-135M's shapes, then writes and reads them back with each value
dtype. It reports the payload bytes, the bytes per kept value, and the error of the decoded
values: RMS and maximum, both divided by the RMS of the exact values.

Usage: python benchmarks/value_dtype_bench.py [--layers 4] [--drop-rate 0.9]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from apply_bench import smollm2_shapes
from deltastore.format import read_delta, write_delta
from deltastore.methods import PruneOptions, prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="number of SmolLM2-135M layers to build (default: 4)")
    parser.add_argument("--drop-rate", type=float, default=0.9, help="DARE drop rate (default: 0.9)")
    parser.add_argument("--delta-std", type=float, default=1e-3, help="standard deviation of the deltas (default: 0.001)")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    prefixes = tuple(f"model.layers.{layer}." for layer in range(args.layers))
    entries = {}
    for name, shape in smollm2_shapes().items():
        if name.startswith(prefixes):
            delta = torch.randn(shape, generator=generator) * args.delta_std
            entries[name] = prune(delta, method="dare", name=name, options=PruneOptions(drop_rate=args.drop_rate))
    exact = torch.cat([entry.values for entry in entries.values()])
    rms = float(exact.pow(2).mean().sqrt())

    print(f"{len(entries)} tensors, {exact.numel():,} kept values, DARE drop rate {args.drop_rate}, delta std {args.delta_std}\n")
    print("| value dtype | payload bytes | bytes per kept value | RMS error / RMS value | max error / RMS value |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for value_dtype in ("float32", "float16", "bfloat16", "int8"):
            path = Path(folder) / f"{value_dtype}.delta.safetensors"
            metadata = write_delta(path, task="bench", base_fingerprint="sha256:0", method="dare", params={},
                                   entries=entries, value_dtype=value_dtype)
            decoded = read_delta(path).entries
            values = torch.cat([decoded[name].values for name in entries])
            error = (values - exact).abs()
            print(f"| {value_dtype} | {metadata.nbytes:,} | {metadata.nbytes / exact.numel():.3f} | "
                  f"{float(error.pow(2).mean().sqrt()) / rms:.2e} | {float(error.max()) / rms:.2e} |")


if __name__ == "__main__":
    main()
