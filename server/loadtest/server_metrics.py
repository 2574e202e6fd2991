"""Read the counters a load test compares from a deltamux server's Prometheus `/metrics` text."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class ServerCounters:
    """Counters of one /metrics scrape; the report subtracts a scrape before the run from one after it."""

    swaps: float = 0.0
    requests: dict[tuple[str, str], float] = field(default_factory=dict)  # (task, status) -> count, all endpoints
    tokens: dict[str, float] = field(default_factory=dict)  # task -> completion tokens
    stage_seconds: dict[str, float] = field(default_factory=dict)  # swap stage -> total seconds
    stage_counts: dict[str, float] = field(default_factory=dict)  # swap stage -> observations

    @property
    def total_tokens(self) -> float:
        return sum(self.tokens.values())


def parse_metrics(text: str) -> ServerCounters:
    """Pick the swap, request, token and swap-stage counters out of a /metrics page."""
    counters = ServerCounters()
    requests: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "deltamux_swaps_total":
                counters.swaps = value
            elif name == "deltamux_requests_total":
                requests[(labels.get("task", ""), labels.get("status", ""))] += value
            elif name == "deltamux_tokens_generated_total":
                counters.tokens[labels.get("task", "")] = value
            elif name == "deltamux_swap_stage_seconds_sum":
                counters.stage_seconds[labels.get("stage", "")] = value
            elif name == "deltamux_swap_stage_seconds_count":
                counters.stage_counts[labels.get("stage", "")] = value
    counters.requests = dict(requests)
    return counters


def subtract(after: ServerCounters, before: ServerCounters) -> ServerCounters:
    """Return the counts added between two scrapes."""

    def minus(a: dict, b: dict) -> dict:
        return {key: value - b.get(key, 0.0) for key, value in a.items() if value - b.get(key, 0.0) != 0.0}

    return ServerCounters(
        swaps=after.swaps - before.swaps,
        requests=minus(after.requests, before.requests),
        tokens=minus(after.tokens, before.tokens),
        stage_seconds=minus(after.stage_seconds, before.stage_seconds),
        stage_counts=minus(after.stage_counts, before.stage_counts),
    )
