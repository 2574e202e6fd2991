"""Benchmark compression: time, peak RSS and bytes per task at several drop rates.

Each compression runs in a fresh child process, so its peak resident set size is its own and
not the maximum of earlier runs. The table compares the delta's bytes with the bf16 checkpoint
of the base (2 bytes per base weight) and with the base's stored bytes.

    .venv/bin/python benchmarks/compress_bench.py --base DIR --finetuned DIR [--method dare]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_DROP_RATES = (0.9, 0.99, 0.999)


def _rss_mib_now() -> float:
    """Return the current resident set size in MiB (Linux /proc), or NaN elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(args: argparse.Namespace) -> None:
    """Compress once in this process and print one JSON line with the measurements."""
    from deltastore.checkpoint import Checkpoint, fingerprint
    from deltastore.compress import compress

    # Fingerprint first, so its one-time cost (cached beside the base) is not counted as compression.
    fingerprint(args.base)
    rss_before = _rss_mib_now()
    start = time.perf_counter()
    metadata = compress(
        base=args.base,
        finetuned=args.finetuned,
        task=args.task,
        store=args.store,
        method=args.method,
        drop_rate=args.drop_rate,
        seed=args.seed,
        q=args.q,
        calibration=args.calibration,
        value_dtype=args.value_dtype,
    )
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux.
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = Checkpoint.open(args.base)
    print(
        json.dumps(
            {
                "drop_rate": args.drop_rate,
                "seconds": seconds,
                "rss_before_mib": rss_before,
                "peak_rss_mib": peak_mib,
                "nnz": metadata.nnz,
                "nbytes": metadata.nbytes,
                "file_bytes": (Path(args.store) / f"{args.task}.delta.safetensors").stat().st_size,
                "base_numel": base.numel(),
                "base_nbytes": base.nbytes(),
            }
        )
    )


def run_parent(args: argparse.Namespace) -> None:
    """Run one child per drop rate and print a markdown table."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as scratch:
        for drop_rate in args.drop_rates:
            command = [
                sys.executable, __file__, "--child",
                "--base", str(args.base), "--finetuned", str(args.finetuned),
                "--store", scratch, "--task", f"bench-{drop_rate:g}",
                "--method", args.method, "--drop-rate", repr(drop_rate), "--seed", str(args.seed),
                "--value-dtype", args.value_dtype,
            ]
            if args.q is not None:
                command += ["--q", repr(args.q)]
            if args.calibration is not None:
                command += ["--calibration", str(args.calibration)]
            result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"compression at drop rate {drop_rate} failed:\n{result.stderr}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    first = rows[0]
    bf16_bytes = 2 * first["base_numel"]
    print(f"base: {args.base} ({first['base_numel']:,} weights, {first['base_nbytes'] / 2**20:.1f} MiB stored, "
          f"{bf16_bytes / 2**20:.1f} MiB in bf16)")
    print(f"fine-tune: {args.finetuned}; method {args.method}, seed {args.seed}, value dtype {args.value_dtype}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print()
    print("| drop rate | time (s) | peak RSS (MiB) | RSS before (MiB) | nnz | payload bytes | file bytes "
          "| bytes per kept value | ratio to bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        per_value = row["nbytes"] / row["nnz"] if row["nnz"] else float("nan")
        print(
            f"| {row['drop_rate']:g} | {row['seconds']:.2f} | {row['peak_rss_mib']:.0f} | {row['rss_before_mib']:.0f} "
            f"| {row['nnz']:,} | {row['nbytes']:,} | {row['file_bytes']:,} | {per_value:.2f} "
            f"| {row['file_bytes'] / bf16_bytes:.5f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="base checkpoint folder")
    parser.add_argument("--finetuned", required=True, type=Path, help="fine-tuned checkpoint folder")
    parser.add_argument("--method", default="dare", help="pruning method (default: dare)")
    parser.add_argument(
        "--drop-rates",
        type=lambda text: tuple(float(part) for part in text.split(",")),
        default=DEFAULT_DROP_RATES,
        help="comma-separated drop rates, each in [0, 1) (default: 0.9,0.99,0.999)",
    )
    parser.add_argument("--seed", type=int, default=0, help="mask seed (default: 0)")
    parser.add_argument("--q", type=float, default=None, help="darex-q rescale q (default: none)")
    parser.add_argument("--calibration", type=Path, default=None, help="calibration text for wanda (default: none)")
    parser.add_argument("--value-dtype", default="float16", help="stored value dtype (default: float16)")
    # Used by the child processes only.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--drop-rate", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        sys.path.insert(0, str(REPOSITORY))
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
