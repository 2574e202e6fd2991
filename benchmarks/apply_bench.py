"""Time apply + restore of one task's delta against the memory-traffic bound, in one run.

For each drop rate the script builds a DARE-style random delta over every attention and MLP
projection of the base (the real checkpoint with --base, else random tensors of SmolLM2-135M's
shapes), then measures:

- apply + restore (exact mode) and add + subtract (subtract mode), median of --repeats;
- the memory-traffic bound: the bytes a perfect kernel must move, divided by the copy bandwidth
  measured in the same run. Those bytes are the delta's indices and values, the saved values
  (written, then read back), and every touched 64-byte line of weights, read and written in both
  apply and restore;
- a full-weight swap: copying every projection weight in, the naive way of switching fine-tunes;
- exact apply + restore again on a packed copy of the weights (`pack_parameters`: one buffer, so
  one gather and one scatter serve every tensor of the delta), which is how the server keeps them.

Usage: python benchmarks/apply_bench.py [--base DIR] [--dtype float32|bfloat16|float16]
Prints a markdown table; ratios are relative to the bound and to the full copy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from deltastore.apply import DecodedDelta, DecodedTensor, apply, pack_parameters, restore

CACHE_LINE = 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_shapes() -> dict[str, tuple[int, int]]:
    """Return the projection shapes of SmolLM2-135M: 30 layers, hidden 576, 3 KV heads of 64, FFN 1536."""
    shapes = {}
    for layer in range(30):
        prefix = f"model.layers.{layer}"
        shapes.update(
            {
                f"{prefix}.self_attn.q_proj.weight": (576, 576),
                f"{prefix}.self_attn.k_proj.weight": (192, 576),
                f"{prefix}.self_attn.v_proj.weight": (192, 576),
                f"{prefix}.self_attn.o_proj.weight": (576, 576),
                f"{prefix}.mlp.gate_proj.weight": (1536, 576),
                f"{prefix}.mlp.up_proj.weight": (1536, 576),
                f"{prefix}.mlp.down_proj.weight": (576, 1536),
            }
        )
    return shapes


def load_params(base: str | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if base is None:
        generator = torch.Generator().manual_seed(0)
        return {name: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for name, shape in smollm2_shapes().items()}
    from deltastore.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(base)
    names = [n for n in checkpoint.names if n.endswith(".weight") and any(p in n for p in PROJECTIONS)]
    return {name: checkpoint.get(name).to(dtype).contiguous() for name in names}


def random_delta(params: dict[str, torch.Tensor], drop_rate: float, seed: int = 0) -> DecodedDelta:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for name, weight in params.items():
        keep = torch.rand(weight.numel(), generator=generator) >= drop_rate
        indices = keep.nonzero().view(-1)
        values = torch.randn(indices.numel(), generator=generator) * 1e-3 / (1 - drop_rate)
        tensors.append(DecodedTensor(name=name, indices=indices, values=values))
    return DecodedDelta(task=f"p{drop_rate}", tensors=tensors, device=torch.device("cpu"), nnz=sum(t.indices.numel() for t in tensors))


def traffic_bytes(params: dict[str, torch.Tensor], delta: DecodedDelta) -> int:
    """Return the bytes one apply + restore must move at the least (see the module docstring)."""
    total = 0
    for tensor in delta.tensors:
        weight = params[tensor.name]
        itemsize = weight.element_size()
        nnz = tensor.indices.numel()
        lines = torch.unique(tensor.indices * itemsize // CACHE_LINE).numel()
        delta_read = nnz * (tensor.indices.element_size() + tensor.values.element_size())  # apply
        delta_read += nnz * tensor.indices.element_size()  # restore reads the indices again
        saved = 2 * nnz * itemsize  # written by apply, read by restore
        weights = 4 * lines * CACHE_LINE  # each touched line read and written, in apply and in restore
        total += delta_read + saved + weights
    return total


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Measure bytes per second of a large tensor copy (read plus write)."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base checkpoint folder (default: random tensors of SmolLM2-135M's shapes)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: float32)")
    parser.add_argument("--drop-rates", default="0.9,0.99,0.999", help="comma-separated drop rates (default: 0.9,0.99,0.999)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per measurement; the median is reported (default: 7)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    params = load_params(args.base, dtype)
    weight_bytes = sum(w.numel() * w.element_size() for w in params.values())
    bandwidth = copy_bandwidth()
    copies = {name: w.clone() for name, w in params.items()}

    def full_copy() -> None:
        for name, weight in params.items():
            weight.copy_(copies[name])

    full_seconds = median_seconds(full_copy, args.repeats)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; weights {args.dtype}, "
          f"{weight_bytes / 1e6:.1f} MB of projections ({'checkpoint ' + args.base if args.base else 'random, SmolLM2-135M shapes'})")
    print(f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s (read + write); full-weight copy: {full_seconds * 1e3:.1f} ms\n")
    packed = {name: w.clone() for name, w in params.items()}
    pack_parameters(packed)
    print("| drop rate | nnz | bound (ms) | exact apply+restore (ms) | x bound | packed exact (ms) | x bound | "
          "subtract add+sub (ms) | x bound | packed exact vs full copy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for drop_rate in (float(p) for p in args.drop_rates.split(",")):
        delta = random_delta(params, drop_rate)
        bound = traffic_bytes(params, delta) / bandwidth
        exact = median_seconds(lambda: restore(params, apply(params, delta)), args.repeats)
        packed_delta = random_delta(packed, drop_rate)
        restore(packed, apply(packed, packed_delta))  # builds the buffer positions once, as a server load does
        packed_exact = median_seconds(lambda: restore(packed, apply(packed, packed_delta)), args.repeats)
        subtract = median_seconds(lambda: restore(params, apply(params, delta, mode="subtract")), args.repeats)
        print(
            f"| {drop_rate} | {delta.nnz:,} | {bound * 1e3:.2f} | {exact * 1e3:.2f} | {exact / bound:.2f} | "
            f"{packed_exact * 1e3:.2f} | {packed_exact / bound:.2f} | {subtract * 1e3:.2f} | {subtract / bound:.2f} | "
            f"{packed_exact / full_seconds:.3f} |"
        )


if __name__ == "__main__":
    main()
