"""Every rejected /v1 request increments deltamux_rejected_requests, labelled by status and task."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import BASE_ID
from tests.server.support import LiveServer

METRIC = "deltamux_rejected_requests"


def rejected_counts(live: LiveServer) -> dict[tuple[str, str], float]:
    """Return the counter's value per (status, task) from /metrics."""
    text = httpx.get(f"{live.base_url}/metrics").text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != METRIC:
            continue
        for sample in family.samples:
            if sample.name == f"{METRIC}_total":
                counts[(sample.labels["status"], sample.labels["task"])] = sample.value
    return counts


def increase(before: dict, after: dict) -> dict[tuple[str, str], float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}


def _completion(live: LiveServer, body: dict) -> httpx.Response:
    return httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=60)


def test_validation_error_counted(live) -> None:
    before = rejected_counts(live)
    assert _completion(live, {"model": BASE_ID, "prompt": 5}).status_code == 400
    assert increase(before, rejected_counts(live)) == {("400", "unknown"): 1.0}


def test_unknown_model_not_a_label(live) -> None:
    before = rejected_counts(live)
    assert _completion(live, {"model": "secret-task-name", "prompt": "I"}).status_code == 404
    assert increase(before, rejected_counts(live)) == {("404", "unknown"): 1.0}
    assert "secret-task-name" not in httpx.get(f"{live.base_url}/metrics").text


def test_known_task_labelled(live) -> None:
    before = rejected_counts(live)
    body = {"model": "alpha", "prompt": "I", "max_tokens": live.runtime.context_length}
    assert _completion(live, body).status_code == 400
    assert increase(before, rejected_counts(live)) == {("400", "alpha"): 1.0}


def test_oversized_body_counted(live) -> None:
    before = rejected_counts(live)
    body = {"model": BASE_ID, "prompt": "x" * (live.runtime.settings.max_request_bytes + 1)}
    assert _completion(live, body).status_code == 413
    assert increase(before, rejected_counts(live)) == {("413", "unknown"): 1.0}


def test_invalid_upload_counted(live) -> None:
    before = rejected_counts(live)
    response = httpx.post(
        f"{live.base_url}/v1/deltas", params={"task": "junk"}, content=b"\x00\x01not a delta",
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 422
    assert increase(before, rejected_counts(live)) == {("422", "unknown"): 1.0}


def test_queue_full_counted(live) -> None:
    engine = live.runtime.engine
    limit = engine.max_queued_requests
    engine.max_queued_requests = 0
    try:
        before = rejected_counts(live)
        assert _completion(live, {"model": "beta", "prompt": "I", "max_tokens": 2}).status_code == 429
    finally:
        engine.max_queued_requests = limit
    assert increase(before, rejected_counts(live)) == {("429", "beta"): 1.0}


def test_timeout_counted(live, monkeypatch) -> None:
    monkeypatch.setattr(live.runtime.settings, "request_timeout", 0.0)
    before = rejected_counts(live)
    assert _completion(live, {"model": "alpha", "prompt": "I", "max_tokens": 2}).status_code == 504
    assert increase(before, rejected_counts(live)) == {("504", "alpha"): 1.0}


def test_draining_counted(live) -> None:
    before = rejected_counts(live)
    live.app.state.draining = True
    try:
        status = _completion(live, {"model": BASE_ID, "prompt": "I", "max_tokens": 2}).status_code
    finally:
        live.app.state.draining = False
    assert status == 503
    assert increase(before, rejected_counts(live)) == {("503", "unknown"): 1.0}


@pytest.mark.parametrize(("method", "path", "status"), [("get", "/v1/nothing", 404), ("get", "/v1/completions", 405)])
def test_unknown_route_counted(live, method: str, path: str, status: int) -> None:
    before = rejected_counts(live)
    assert httpx.request(method, f"{live.base_url}{path}").status_code == status
    assert increase(before, rejected_counts(live)) == {(str(status), "unknown"): 1.0}


def test_health_routes_not_counted(live) -> None:
    before = rejected_counts(live)
    assert httpx.get(f"{live.base_url}/nothing").status_code == 404
    assert increase(before, rejected_counts(live)) == {}
