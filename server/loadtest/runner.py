"""The load generator: streaming completion requests to one deltamux server, timed per token.

Two arrival processes:

- open loop (`rate`): Poisson arrivals with exponential gaps of mean 1/rate seconds. Each request
  starts whether or not earlier ones have finished, so the offered load does not depend on the
  server's speed. A trace mix replays its recorded arrival times instead.
- closed loop (`concurrency`): N users, each sending its next request when the last one ends.

Every request streams (server-sent events) so the client sees the time to the first token and the
gaps between text chunks. Failures (HTTP errors, errors inside the stream, refused connections,
timeouts) are recorded with their status and never stop the run. A poller scrapes `/metrics`
every `metrics_interval` seconds for the swap and token counters over time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from server.loadtest.mix import TaskMix
from server.loadtest.prompts import Prompt
from server.loadtest.server_metrics import ServerCounters, parse_metrics

logger = logging.getLogger(__name__)

STATUS_OK = "200"
STATUS_STREAM_ERROR = "stream_error"  # the server sent an error event after the stream had started
STATUS_CONNECTION_ERROR = "connection_error"
STATUS_TIMEOUT = "timeout"


class LoadTestError(RuntimeError):
    """The load test cannot start: for example, the server is unreachable."""


@dataclass(frozen=True)
class LoadConfig:
    """Settings of one load test: the target, the task mix, the arrival process and the request shape."""

    url: str
    mix: TaskMix
    prompts: list[Prompt]
    duration: float  # seconds during which requests start; the run then waits for those in flight
    rate: float | None = None  # open loop: mean arrivals per second
    concurrency: int | None = None  # closed loop: users
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False
    api_key: str | None = None
    seed: int = 0
    request_timeout: float = 600.0
    metrics_interval: float = 1.0
    progress: bool = True


@dataclass
class RequestRecord:
    """One request as the client saw it; times are seconds, `start` counts from the run start."""

    task: str
    start: float
    status: str = STATUS_OK
    latency: float | None = None  # request sent to stream closed
    ttft: float | None = None  # request sent to the first non-empty text chunk
    completion_tokens: int = 0
    chunk_gaps: list[float] = field(default_factory=list)  # between consecutive text chunks
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


@dataclass(frozen=True)
class MetricsSample:
    """The server's cumulative counters at `offset` seconds into the run."""

    offset: float
    swaps: float
    tokens: float


@dataclass
class RunResult:
    config: LoadConfig
    started: str  # ISO time of the run start (UTC)
    elapsed: float  # run start to the last request's end
    records: list[RequestRecord]
    before: ServerCounters | None  # None when /metrics could not be read
    after: ServerCounters | None
    samples: list[MetricsSample]


def run_load(config: LoadConfig) -> RunResult:
    """Run the load test to completion and return every request record."""
    return asyncio.run(_run(config))


async def _run(config: LoadConfig) -> RunResult:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = httpx.Timeout(config.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=config.url, headers=headers, timeout=timeout, limits=limits) as client:
        # 1. The server must respond before any load goes out.
        await _check_reachable(client, config.url)
        before = await _scrape(client)
        if before is None:
            logger.warning("cannot read %s/metrics; swap counts will be missing from the report", config.url)

        # 2. Send the load while a poller samples the counters.
        rng = random.Random(config.seed)
        progress = _Progress(config)
        records: list[RequestRecord] = []
        samples: list[MetricsSample] = []
        started = datetime.now(UTC).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        poller = asyncio.create_task(_poll_metrics(client, t0=t0, interval=config.metrics_interval, samples=samples))
        try:
            if config.concurrency is not None:
                await _closed_loop(client, config, rng=rng, t0=t0, records=records, progress=progress)
            else:
                await _open_loop(client, config, rng=rng, t0=t0, records=records, progress=progress)
            elapsed = time.perf_counter() - t0
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            progress.close()

        # 3. Counters after the run, and one last sample for the timeline.
        after = await _scrape(client)
        if after is not None:
            samples.append(MetricsSample(offset=time.perf_counter() - t0, swaps=after.swaps, tokens=after.total_tokens))
    records.sort(key=lambda r: r.start)
    return RunResult(
        config=config, started=started, elapsed=elapsed, records=records, before=before, after=after, samples=samples
    )


# -- arrival processes ---------------------------------------------------------------------------


def poisson_offsets(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Return arrival times in [0, duration) of a Poisson process with `rate` arrivals per second."""
    offsets = []
    t = rng.expovariate(rate)
    while t < duration:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def _open_loop(
    client: httpx.AsyncClient, config: LoadConfig, *, rng: random.Random, t0: float,
    records: list[RequestRecord], progress: _Progress,
) -> None:
    if config.mix.trace is not None:
        arrivals = [(a.offset, a.task) for a in config.mix.trace if a.offset < config.duration]
        dropped = len(config.mix.trace) - len(arrivals)
        if dropped:
            logger.info("the trace has %d arrivals after --duration %.1f s; they are not sent", dropped, config.duration)
    else:
        offsets = poisson_offsets(config.rate, config.duration, rng)
        arrivals = [(offset, config.mix.draw(rng)) for offset in offsets]
    progress.set_total(len(arrivals))

    in_flight: set[asyncio.Task] = set()
    for offset, task in arrivals:
        delay = offset - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        prompt = rng.choice(config.prompts)
        job = asyncio.create_task(_send_and_record(client, config, task=task, prompt=prompt, t0=t0, records=records, progress=progress))
        in_flight.add(job)
        job.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)


async def _closed_loop(
    client: httpx.AsyncClient, config: LoadConfig, *, rng: random.Random, t0: float,
    records: list[RequestRecord], progress: _Progress,
) -> None:
    async def user(user_rng: random.Random) -> None:
        while time.perf_counter() - t0 < config.duration:
            task = config.mix.draw(user_rng)
            prompt = user_rng.choice(config.prompts)
            await _send_and_record(client, config, task=task, prompt=prompt, t0=t0, records=records, progress=progress)

    # Each user draws from its own generator, seeded from the run seed, so a run is reproducible.
    await asyncio.gather(*(user(random.Random(rng.getrandbits(64))) for _ in range(config.concurrency)))


async def _send_and_record(
    client: httpx.AsyncClient, config: LoadConfig, *, task: str, prompt: Prompt, t0: float,
    records: list[RequestRecord], progress: _Progress,
) -> None:
    record = await send_request(client, config, task=task, prompt=prompt, t0=t0)
    records.append(record)
    progress.update(record)


# -- one request ---------------------------------------------------------------------------------


def request_body(config: LoadConfig, *, task: str, prompt: Prompt) -> tuple[str, dict]:
    """Return the route and JSON body of one streaming request."""
    body: dict = {
        "model": task, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": config.max_tokens, "temperature": config.temperature,
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    if prompt.is_chat:
        return "/v1/chat/completions", {**body, "messages": list(prompt.messages)}
    return "/v1/completions", {**body, "prompt": prompt.text}


async def send_request(client: httpx.AsyncClient, config: LoadConfig, *, task: str, prompt: Prompt, t0: float) -> RequestRecord:
    """Send one streaming request and time it; every failure becomes a record, never an exception."""
    path, body = request_body(config, task=task, prompt=prompt)
    start = time.perf_counter()
    record = RequestRecord(task=task, start=start - t0)
    chunks = 0
    last: float | None = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                record.status = str(response.status_code)
                record.error = _error_message(await response.aread())
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.status = STATUS_STREAM_ERROR
                    record.error = str(chunk["error"].get("message", chunk["error"]))
                    break
                if chunk.get("usage"):
                    record.completion_tokens = int(chunk["usage"].get("completion_tokens", 0))
                if _chunk_text(chunk):
                    now = time.perf_counter()
                    chunks += 1
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.chunk_gaps.append(now - last)
                    last = now
    except httpx.TimeoutException as e:
        record.status, record.error = STATUS_TIMEOUT, f"{type(e).__name__}: {e}"
    except httpx.TransportError as e:
        record.status, record.error = STATUS_CONNECTION_ERROR, f"{type(e).__name__}: {e}"
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        record.status, record.error = STATUS_STREAM_ERROR, f"malformed stream event: {e}"
    record.latency = time.perf_counter() - start
    if record.ok and record.completion_tokens == 0:
        record.completion_tokens = chunks  # a server without usage chunks: one chunk is about one token
    return record


def _chunk_text(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", errors="replace")


# -- the server's counters -------------------------------------------------------------------


async def _check_reachable(client: httpx.AsyncClient, url: str) -> None:
    try:
        response = await client.get("/health", timeout=10.0)
    except httpx.TransportError as e:
        raise LoadTestError(f"cannot reach the server at {url}: {type(e).__name__}: {e}") from e
    if response.status_code >= 500:
        raise LoadTestError(f"the server at {url} is not healthy: GET /health returned {response.status_code}")

    # /v1/models needs the same key as the completion routes, so a wrong key fails here, not on every request.
    models = await client.get("/v1/models", timeout=10.0)
    if models.status_code in (401, 403):
        given = "the --api-key given" if client.headers.get("authorization") else "no --api-key"
        raise LoadTestError(f"the server at {url} rejected {given}: GET /v1/models returned {models.status_code}")
    if models.status_code == 503:
        raise LoadTestError(f"the server at {url} is not ready yet (GET /v1/models returned 503); retry once /ready returns 200")


async def _scrape(client: httpx.AsyncClient) -> ServerCounters | None:
    try:
        response = await client.get("/metrics", timeout=10.0)
    except httpx.TransportError as e:
        logger.warning("GET /metrics failed: %s", e)
        return None
    if response.status_code != 200:
        logger.warning("GET /metrics returned %d", response.status_code)
        return None
    return parse_metrics(response.text)


async def _poll_metrics(client: httpx.AsyncClient, *, t0: float, interval: float, samples: list[MetricsSample]) -> None:
    while True:
        counters = await _scrape(client)
        if counters is not None:
            samples.append(MetricsSample(offset=time.perf_counter() - t0, swaps=counters.swaps, tokens=counters.total_tokens))
        await asyncio.sleep(interval)


# -- progress display --------------------------------------------------------------------------


class _Progress:
    """A tqdm bar of finished requests with the error count; silent when `config.progress` is off."""

    def __init__(self, config: LoadConfig) -> None:
        self._bar = None
        self.errors = 0
        if config.progress:
            from tqdm import tqdm  # noqa: PLC0415 (only the CLI shows progress)

            self._bar = tqdm(total=None, unit="req", desc="loadtest", dynamic_ncols=True)

    def set_total(self, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, record: RequestRecord) -> None:
        if not record.ok:
            self.errors += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(task=record.task, errors=self.errors, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
