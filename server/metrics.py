"""Prometheus metrics of one server instance, kept in their own registry.

A registry per app (instead of the process-wide default) lets tests start several apps in one
process without duplicate-metric errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Swap stages, in the order a cold swap runs them.
STAGE_DISK_LOAD = "disk_load"  # read and verify the delta file
STAGE_COPY_TO_DEVICE = "copy_to_device"  # decode the delta into index/value tensors on the model's device
STAGE_APPLY = "apply"  # write base + delta into the weights
STAGE_RESTORE = "restore"  # write the saved base values back
SWAP_STAGES = (STAGE_DISK_LOAD, STAGE_COPY_TO_DEVICE, STAGE_APPLY, STAGE_RESTORE)

UNKNOWN_TASK = "unknown"  # task label of a request whose model was not resolved or not allowed

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Metrics:
    """Every metric the server exports; label `task` is the model id of the request (base or task)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry

        # Requests and tokens, per task.
        self.requests = Counter(
            "deltamux_requests", "Completion requests finished, by task, endpoint and HTTP status.",
            ["task", "endpoint", "status"], registry=r,
        )
        self.rejected_requests = Counter(
            "deltamux_rejected_requests",
            "/v1 requests answered with an error status (4xx or 5xx before the response started), by status "
            "and task; task is 'unknown' until the model is resolved and allowed for the caller.",
            ["status", "task"], registry=r,
        )
        self.request_latency = Histogram(
            "deltamux_request_latency_seconds", "Time from arrival to the last token, by task.",
            ["task"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "deltamux_queue_wait_seconds", "Time a request waited in its task queue before its batch started.",
            ["task"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "deltamux_time_to_first_token_seconds", "Time from arrival to the first generated token, by task.",
            ["task"], buckets=_LATENCY_BUCKETS, registry=r,
        )

        # Queues and batches.
        self.queue_depth = Gauge(
            "deltamux_queue_depth", "Requests waiting in each task's queue.", ["task"], registry=r
        )
        self.tokens_generated = Counter(
            "deltamux_tokens_generated", "Completion tokens generated, by task.", ["task"], registry=r
        )
        self.prompt_tokens = Counter(
            "deltamux_prompt_tokens", "Prompt tokens processed, by task.", ["task"], registry=r
        )
        self.batch_size = Histogram(
            "deltamux_batch_size", "Requests per generated batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.mixed_batches = Counter(
            "deltamux_mixed_batches", "Batches that mixed several tasks on the base weights (batching mixed).",
            registry=r,
        )

        # Swaps and the delta caches.
        self.swaps = Counter(
            "deltamux_swaps", "Weight swaps (restore the current delta, apply the next).", registry=r
        )
        self.swap_stage_seconds = Histogram(
            "deltamux_swap_stage_seconds", "Time of each swap stage: disk_load, copy_to_device, apply, restore.",
            ["stage"], buckets=_STAGE_BUCKETS, registry=r,
        )
        self.delta_loads = Counter(
            "deltamux_delta_loads", "Deltas loaded into a cache tier, by tier (device, cpu).", ["tier"], registry=r
        )
        self.delta_hits = Counter(
            "deltamux_delta_hits", "Delta lookups served by a cache tier, by tier.", ["tier"], registry=r
        )
        self.delta_evictions = Counter(
            "deltamux_delta_evictions", "Deltas evicted from a cache tier, by tier.", ["tier"], registry=r
        )
        self.cache_bytes = Gauge(
            "deltamux_delta_cache_bytes", "Bytes of deltas held in each cache tier.", ["tier"], registry=r
        )
        self.tasks = Gauge("deltamux_tasks", "Tasks in the delta store.", registry=r)

    def count_rejected(self, *, status: int, task: str | None) -> None:
        # A name the caller sent but may not use never becomes a label: labels would leak task
        # names to /metrics readers and grow without bound.
        self.rejected_requests.labels(status=str(status), task=task or UNKNOWN_TASK).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage not in SWAP_STAGES:
            raise ValueError(f"unknown swap stage {stage!r}; expected one of {SWAP_STAGES!r}")
        self.swap_stage_seconds.labels(stage=stage).observe(seconds)

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text format."""
        return generate_latest(self.registry)
