"""Drift of the base weights after repeated swaps: `subtract` against `exact`, per dtype.

The server's `subtract` swap mode adds a delta in the weight dtype and subtracts it again, so every
apply + restore rounds twice and the base slowly moves away from its stored values. `exact` saves
and writes back the base values, so it stays bit-identical. For each dtype the script applies and
restores --tasks different random DARE-style deltas (drop rate --drop-rate, over every attention
and MLP projection of the base) in turn, --cycles times, and reports how many base weights
changed and by how much, against the RMS of the tensor that holds them.

Usage: python benchmarks/drift_bench.py --base /work/base1 [--cycles 100]
"""

from __future__ import annotations

import argparse
import platform

import torch

from deltastore.apply import DecodedDelta, DecodedTensor, apply, restore
from deltastore.checkpoint import Checkpoint

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_delta(params: dict[str, torch.Tensor], *, drop_rate: float, seed: int) -> DecodedDelta:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for name, weight in params.items():
        indices = (torch.rand(weight.numel(), generator=generator) >= drop_rate).nonzero().view(-1)
        values = torch.randn(indices.numel(), generator=generator) * 1e-3 / (1 - drop_rate)
        tensors.append(DecodedTensor(name=name, indices=indices, values=values))
    nnz = sum(t.indices.numel() for t in tensors)
    return DecodedDelta(task=f"seed{seed}", tensors=tensors, device=torch.device("cpu"), nnz=nnz)


def drift(params: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> tuple[int, float, float]:
    """Return (changed weights, max abs change, max abs change over the RMS of its tensor's base weights)."""
    changed, max_abs, max_rel = 0, 0.0, 0.0
    for name, weight in params.items():
        # Compare in float32: exact in every dtype here, since all three convert to float32 without rounding.
        diff = (weight.float() - original[name].float()).abs()
        changed += int((diff > 0).sum())
        max_abs = max(max_abs, float(diff.max()))
        rms = float(original[name].float().pow(2).mean().sqrt())
        max_rel = max(max_rel, float(diff.max()) / rms)
    return changed, max_abs, max_rel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--cycles", type=int, default=100, help="apply + restore cycles per mode and dtype (default: 100)")
    parser.add_argument("--tasks", type=int, default=4, help="different deltas swapped in turn (default: 4)")
    parser.add_argument("--drop-rate", type=float, default=0.99, help="drop rate of the random deltas (default: 0.99)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32", help="comma-separated weight dtypes")
    args = parser.parse_args()

    checkpoint = Checkpoint.open(args.base)
    names = [n for n in checkpoint.names if n.endswith(".weight") and any(p in n for p in PROJECTIONS)]
    base32 = {name: checkpoint.get(name).float().contiguous() for name in names}
    total = sum(t.numel() for t in base32.values())
    deltas = [random_delta(base32, drop_rate=args.drop_rate, seed=seed) for seed in range(1, args.tasks + 1)]
    checkpoints = sorted({1, 10, args.cycles})

    print(f"{platform.machine()}, torch {torch.__version__}; base {args.base}: {len(names)} projections, {total:,} weights; "
          f"{args.tasks} deltas at drop rate {args.drop_rate} ({deltas[0].nnz:,} nnz each), swapped in turn\n")
    print("| dtype | mode | cycles | changed weights | changed share | max abs change | max change / tensor RMS |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        original = {name: t.to(dtype) for name, t in base32.items()}
        for mode in ("subtract", "exact"):
            params = {name: t.clone() for name, t in original.items()}
            for cycle in range(1, args.cycles + 1):
                applied = apply(params, deltas[(cycle - 1) % len(deltas)], mode=mode)
                restore(params, applied)
                if cycle in checkpoints:
                    changed, max_abs, max_rel = drift(params, original)
                    print(f"| {dtype_name} | {mode} | {cycle} | {changed:,} | {changed / total:.2e} | {max_abs:.3e} | {max_rel:.3e} |")


if __name__ == "__main__":
    main()
