"""PNG plots of a load test, drawn with matplotlib's Agg backend (no display needed).

- latency_cdf.png: the empirical CDF of time to first token and of end-to-end latency, per task;
- timeline.png: completion tokens/s of finished requests per time bin, and the server's swaps per
  bin from the /metrics samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.loadtest.report import latency_samples
from server.loadtest.runner import RunResult


def write_plots(result: RunResult, out: Path) -> tuple[Path, ...]:
    """Draw both plots into `out` and return their paths."""
    import matplotlib  # noqa: PLC0415 (heavy; only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paths = (out / "latency_cdf.png", out / "timeline.png")
    _latency_cdf(plt, result, paths[0])
    _timeline(plt, result, paths[1])
    return paths


def _latency_cdf(plt, result: RunResult, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (field_name, title) in zip(axes, (("ttft", "time to first token"), ("latency", "end-to-end latency"))):
        for task in result.config.mix.tasks:
            values = np.sort(latency_samples([r for r in result.records if r.task == task], field_name))
            if values.size == 0:
                continue
            axis.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=f"{task} (n={values.size})")
        axis.set_title(title)
        axis.set_xlabel("seconds")
        axis.set_ylabel("fraction of requests")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(f"{result.config.mix.spec}, {_load_label(result)}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _timeline(plt, result: RunResult, path: Path) -> None:
    span = max(result.elapsed, 1e-9)
    width = max(span / 60, 1.0)  # seconds per bin: at least 1, at most about 60 bins
    edges = np.arange(0.0, span + width, width)

    # Tokens of each finished request, counted in the bin where it ended.
    ends = [r.start + r.latency for r in result.records if r.ok and r.latency is not None]
    weights = [r.completion_tokens for r in result.records if r.ok and r.latency is not None]
    tokens, _ = np.histogram(ends, bins=edges, weights=weights)

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.bar(edges[:-1], tokens / width, width=width, align="edge", color="tab:blue")
    top.set_ylabel("completion tokens/s")
    top.set_title(f"throughput and swaps over time ({result.config.mix.spec}, {_load_label(result)})")
    top.grid(alpha=0.3)

    samples = result.samples
    if len(samples) >= 2:
        offsets = np.array([s.offset for s in samples])
        swaps = np.array([s.swaps for s in samples])
        bottom.step(offsets, swaps - swaps[0], where="post", color="tab:red", label="swaps since start")
        bottom.legend(fontsize="small")
    else:
        bottom.text(0.5, 0.5, "no /metrics samples", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_xlabel("seconds since start")
    bottom.set_ylabel("swaps (cumulative)")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _load_label(result: RunResult) -> str:
    config = result.config
    if config.rate is not None:
        return f"Poisson {config.rate:g} req/s"
    if config.concurrency is not None:
        return f"{config.concurrency} users"
    return "trace arrivals"
