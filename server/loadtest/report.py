"""Summaries and report files of a load test.

Latency statistics are taken over successful requests only; failures are counted by status.
Throughput divides the completion tokens of successful requests by the run's elapsed time (first
arrival slot to the last request's end). The swap and request counts come from the server's
`/metrics`, read before and after the run, so they include any traffic that other clients sent
to the same server meanwhile.

Files written to the output folder:

- report.json: the configuration, the overall and per-task summaries, and the server counters;
- summary.csv: one row per task plus an `overall` row;
- requests.csv: one row per request;
- latency_cdf.png and timeline.png (see plots.py), unless plotting is switched off.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.loadtest.runner import RequestRecord, RunResult
from server.loadtest.server_metrics import ServerCounters, subtract

logger = logging.getLogger(__name__)

OVERALL = "overall"
PERCENTILES = (50, 90, 99)
LATENCY_FIELDS = ("ttft", "latency", "itl", "tpot")  # seconds; see `latency_samples`


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    summary_csv: Path
    requests_csv: Path
    plots: tuple[Path, ...]


def latency_samples(records: list[RequestRecord], field_name: str) -> list[float]:
    """Return the samples of one latency field over successful requests.

    ttft: time to the first text chunk; latency: end to end; itl: every gap between consecutive text
    chunks (inter-token latency); tpot: per request, (latency - ttft) / (completion tokens - 1).
    """
    ok = [r for r in records if r.ok]
    if field_name == "ttft":
        return [r.ttft for r in ok if r.ttft is not None]
    if field_name == "latency":
        return [r.latency for r in ok if r.latency is not None]
    if field_name == "itl":
        return [gap for r in ok for gap in r.chunk_gaps]
    if field_name == "tpot":
        return [
            (r.latency - r.ttft) / (r.completion_tokens - 1)
            for r in ok
            if r.ttft is not None and r.latency is not None and r.completion_tokens > 1
        ]
    raise ValueError(f"unknown latency field {field_name!r}; expected one of {LATENCY_FIELDS!r}")


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), **{f"p{q}": float(np.percentile(array, q)) for q in PERCENTILES}}


def summarize_group(records: list[RequestRecord], *, elapsed: float) -> dict:
    """Return counts, latency percentiles and throughput of one group of requests."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.status for r in records if not r.ok)
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else None,
        **{name: _stats(latency_samples(records, name)) for name in LATENCY_FIELDS},
    }


def summarize(result: RunResult) -> dict:
    """Return the whole report as JSON-ready data."""
    config = result.config
    groups = {OVERALL: summarize_group(result.records, elapsed=result.elapsed)}
    for task in config.mix.tasks:
        groups[task] = summarize_group([r for r in result.records if r.task == task], elapsed=result.elapsed)
    return {
        "config": {
            "url": config.url, "mix": config.mix.spec, "tasks": list(config.mix.tasks),
            "mix_probabilities": config.mix.probabilities(), "rate": config.rate, "concurrency": config.concurrency,
            "duration_s": config.duration, "max_tokens": config.max_tokens, "temperature": config.temperature,
            "ignore_eos": config.ignore_eos, "seed": config.seed, "prompts": len(config.prompts),
        },
        "started": result.started,
        "elapsed_s": result.elapsed,
        "summary": groups,
        "server": _server_section(result.before, result.after),
        "timeline": [{"offset_s": s.offset, "swaps": s.swaps, "tokens": s.tokens} for s in result.samples],
    }


def _server_section(before: ServerCounters | None, after: ServerCounters | None) -> dict | None:
    if before is None or after is None:
        return None
    delta = subtract(after, before)
    requests: dict[str, dict[str, int]] = {}
    for (task, status), count in sorted(delta.requests.items()):
        requests.setdefault(task, {})[status] = int(count)
    stages = {
        stage: {"count": int(delta.stage_counts.get(stage, 0)), "mean_ms": seconds / count * 1e3}
        for stage, seconds in delta.stage_seconds.items()
        if (count := delta.stage_counts.get(stage, 0)) > 0
    }
    return {
        "swaps": int(delta.swaps),
        "requests": requests,
        "completion_tokens": {task: int(count) for task, count in sorted(delta.tokens.items())},
        "swap_stages": stages,
    }


def write_report(result: RunResult, out: Path, *, plots: bool = True) -> ReportFiles:
    """Write report.json, summary.csv, requests.csv and (with `plots`) the PNG plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    report = summarize(result)

    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n", encoding="utf-8")

    summary_path = out / "summary.csv"
    with summary_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = ["group", "requests", "ok", "errors", "completion_tokens", "tokens_per_s", "requests_per_s"]
        header += [f"{name}_{stat}_s" for name in LATENCY_FIELDS for stat in ("mean", *(f"p{q}" for q in PERCENTILES))]
        writer.writerow(header)
        for group, summary in report["summary"].items():
            row = [group, summary["requests"], summary["ok"], sum(summary["errors"].values()),
                   summary["completion_tokens"], _cell(summary["tokens_per_s"]), _cell(summary["requests_per_s"])]
            row += [_cell(summary[name][stat]) for name in LATENCY_FIELDS for stat in ("mean", *(f"p{q}" for q in PERCENTILES))]
            writer.writerow(row)

    requests_path = out / "requests.csv"
    with requests_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "start_s", "status", "ttft_s", "latency_s", "completion_tokens", "chunks", "error"])
        for r in result.records:
            writer.writerow([r.task, f"{r.start:.6f}", r.status, _cell(r.ttft), _cell(r.latency), r.completion_tokens,
                             len(r.chunk_gaps) + (r.ttft is not None), r.error or ""])

    plot_paths: tuple[Path, ...] = ()
    if plots:
        from server.loadtest.plots import write_plots  # noqa: PLC0415 (matplotlib only when plotting)

        plot_paths = write_plots(result, out)
    return ReportFiles(json=json_path, summary_csv=summary_path, requests_csv=requests_path, plots=plot_paths)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to the JSON report")


def format_summary(report: dict) -> str:
    """Return a short plain-text table of the report for the terminal."""
    lines = [
        f"{'group':<16} {'ok':>6} {'errors':>6} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'e2e p50':>8} "
        f"{'e2e p99':>8} {'itl p50':>8} {'itl p99':>8}"
    ]
    for group, s in report["summary"].items():
        lines.append(
            f"{group:<16} {s['ok']:>6} {sum(s['errors'].values()):>6} {_num(s['tokens_per_s'], 1):>8} "
            f"{_ms(s['ttft']['p50']):>9} {_ms(s['ttft']['p99']):>9} {_ms(s['latency']['p50']):>8} "
            f"{_ms(s['latency']['p99']):>8} {_ms(s['itl']['p50']):>8} {_ms(s['itl']['p99']):>8}"
        )
    server = report["server"]
    lines.append(f"swaps during the run: {'unknown (/metrics not readable)' if server is None else server['swaps']}")
    errors = report["summary"][OVERALL]["errors"]
    if errors:
        lines.append("errors by status: " + ", ".join(f"{status} x{count}" for status, count in errors.items()))
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}ms"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
