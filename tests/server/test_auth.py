"""API keys: 401 without a key, tenants see only their tasks, admin keys manage deltas."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.auth import KeyConfigError, load_keys, parse_keys
from server.settings import Settings
from tests.server.conftest import BASE_ID
from tests.server.test_rejection_metrics import increase, rejected_counts
from tests.server.support import LiveServer, start_server

TENANT_A = "sk-tenant-a-0123456789abcdef"
TENANT_B = "sk-tenant-b-fedcba9876543210"
ADMIN = "sk-admin-5f1e0c2b7d9a4e38b6"
KEYS = [
    {"name": "tenant-a", "key": TENANT_A, "tasks": ["alpha", BASE_ID]},
    {"name": "tenant-b", "key": TENANT_B, "tasks": ["beta"]},
    {"name": "operator", "key": ADMIN, "tasks": "*", "admin": True},
]


@pytest.fixture(scope="module")
def guarded(tiny_base: Path, delta_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with alpha and beta and three API keys."""
    store = tmp_path_factory.mktemp("auth-store")
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], store / delta_files[task].name)
    settings = Settings(
        base=tiny_base, store=store, device="cpu", base_name=BASE_ID, max_tokens_default=8, api_keys=json.dumps(KEYS)
    )
    server = start_server(settings)
    yield server
    server.stop()


def _headers(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def _client(live: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=key, max_retries=0)


def _upload(live: LiveServer, task: str, data: bytes, key: str | None) -> httpx.Response:
    return httpx.post(
        f"{live.base_url}/v1/deltas", params={"task": task}, content=data,
        headers={"content-type": "application/octet-stream", **_headers(key)}, timeout=60,
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/deltas"),
     ("POST", "/v1/deltas"), ("DELETE", "/v1/deltas/alpha")],
)
@pytest.mark.parametrize("authorization", [None, "Bearer sk-not-a-configured-key-000", "Bearer", f"Basic {TENANT_A}"])
def test_v1_routes_need_valid_key(guarded, method: str, path: str, authorization: str | None) -> None:
    body = {"model": "alpha", "prompt": "I", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.request(method, f"{guarded.base_url}{path}", json=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"


def test_health_ready_metrics_stay_open(guarded) -> None:
    assert httpx.get(f"{guarded.base_url}/health").status_code == 200
    assert httpx.get(f"{guarded.base_url}/ready").status_code == 200
    assert httpx.get(f"{guarded.base_url}/metrics").status_code == 200


def test_metrics_behind_admin_key_when_configured(guarded) -> None:
    settings = guarded.runtime.settings
    settings.metrics_require_key = True
    try:
        assert httpx.get(f"{guarded.base_url}/metrics").status_code == 401
        assert httpx.get(f"{guarded.base_url}/metrics", headers=_headers(TENANT_A)).status_code == 403
        assert httpx.get(f"{guarded.base_url}/metrics", headers=_headers(ADMIN)).status_code == 200
    finally:
        settings.metrics_require_key = False


def test_models_lists_only_tenant_tasks(guarded) -> None:
    assert {m.id for m in _client(guarded, TENANT_A).models.list().data} == {BASE_ID, "alpha"}
    assert {m.id for m in _client(guarded, TENANT_B).models.list().data} == {"beta"}
    assert {m.id for m in _client(guarded, ADMIN).models.list().data} == {BASE_ID, "alpha", "beta"}


def test_tenant_serves_own_task(guarded) -> None:
    result = _client(guarded, TENANT_A).completions.create(model="alpha", prompt="I", max_tokens=3, temperature=0)
    assert result.usage.completion_tokens >= 1
    chat = _client(guarded, TENANT_B).chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert chat.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_other_tenant_task_looks_unknown(guarded, endpoint: str) -> None:
    def error_for(model: str) -> dict:
        body = {"model": model, "prompt": "I", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        response = httpx.post(f"{guarded.base_url}{endpoint}", json=body, headers=_headers(TENANT_B))
        assert response.status_code == 404, response.text
        return response.json()["error"]

    hidden = error_for("alpha")  # exists, but not among tenant-b's tasks
    missing = error_for("alphb")  # does not exist; same length, so the messages can be compared
    assert hidden["message"].replace("'alpha'", "'alphb'") == missing["message"]
    assert {k: v for k, v in hidden.items() if k != "message"} == {k: v for k, v in missing.items() if k != "message"}
    assert error_for(BASE_ID)["code"] == "model_not_found"


def test_non_admin_cannot_manage_deltas(guarded, delta_files) -> None:
    data = delta_files["gamma"].read_bytes()
    for key in (TENANT_A, TENANT_B):
        assert _upload(guarded, "gamma", data, key).status_code == 403
        assert httpx.delete(f"{guarded.base_url}/v1/deltas/alpha", headers=_headers(key)).status_code == 403
        assert httpx.get(f"{guarded.base_url}/v1/deltas", headers=_headers(key)).status_code == 403
    assert not (guarded.store / "gamma.delta.safetensors").exists()
    assert (guarded.store / "alpha.delta.safetensors").exists()


def test_admin_registers_and_deletes(guarded, delta_files) -> None:
    response = _upload(guarded, "gamma", delta_files["gamma"].read_bytes(), ADMIN)
    assert response.status_code == 201, response.text
    listed = httpx.get(f"{guarded.base_url}/v1/deltas", headers=_headers(ADMIN)).json()["data"]
    assert "gamma" in {entry["task"] for entry in listed}
    # A tenant whose tasks do not name gamma still cannot reach it.
    assert "gamma" not in {m.id for m in _client(guarded, TENANT_A).models.list().data}
    deleted = httpx.delete(f"{guarded.base_url}/v1/deltas/gamma", headers=_headers(ADMIN))
    assert deleted.status_code == 200


def test_keys_never_logged(guarded, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    httpx.get(f"{guarded.base_url}/v1/models", headers=_headers("sk-not-a-configured-key-000"))
    httpx.post(f"{guarded.base_url}/v1/completions", json={"model": "beta", "prompt": "I"}, headers=_headers(TENANT_A))
    _client(guarded, TENANT_A).completions.create(model="alpha", prompt="I", max_tokens=2)
    assert "tenant-a" in caplog.text
    for key in (TENANT_A, TENANT_B, ADMIN, "sk-not-a-configured-key-000"):
        assert key not in caplog.text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('{"name": "a", "key": "sk-0123456789abcdef"}', "JSON list"),
        ("[]", "no API keys"),
        ('[{"name": "a", "key": "short"}]', "entry 0"),
        ('[{"name": "a", "key": "sk-0123456789abcdef", "role": "x"}]', "entry 0"),
        ('[{"name": "a", "key": "sk-0123456789abcdef", "admin": "yes"}]', "entry 0"),
        ('[{"name": "a", "key": "sk-0123456789abcdef"}, {"name": "a", "key": "sk-0123456789abcdeg"}]', "twice"),
        ('[{"name": "a", "key": "sk-0123456789abcdef"}, {"name": "b", "key": "sk-0123456789abcdef"}]', "repeats"),
    ],
)
def test_invalid_key_config_rejected(text: str, reason: str) -> None:
    with pytest.raises(KeyConfigError, match=reason) as caught:
        parse_keys(text, source="test")
    assert "sk-0123456789abcde" not in str(caught.value)
    assert "short" not in str(caught.value)


def test_keys_file_and_inline_exclusive(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    ring = load_keys(keys_file=keys_file, inline=None)
    assert ring is not None
    assert ring.authenticate(TENANT_B).name == "tenant-b"
    assert ring.authenticate(TENANT_B + "x") is None
    assert ring.authenticate(TENANT_B[:-1]) is None
    assert load_keys(keys_file=None, inline=None) is None
    with pytest.raises(KeyConfigError, match="not both"):
        load_keys(keys_file=keys_file, inline=json.dumps(KEYS))
    with pytest.raises(KeyConfigError, match="cannot read"):
        load_keys(keys_file=tmp_path / "missing.json", inline=None)


def test_bad_key_config_fails_serve(tiny_base: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    from server.cli import main  # noqa: PLC0415

    monkeypatch.setenv("DELTAMUX_API_KEYS", '[{"name": "a", "key": "short-key"}]')
    code = main(["serve", "--base", str(tiny_base), "--store", str(tmp_path / "store"), "--device", "cpu"])
    assert code == 2
    assert "short-key" not in caplog.text


def test_key_checked_before_body(guarded) -> None:
    # An anonymous caller learns nothing about the request schema or the models.
    for body in ({"model": "alpha"}, {"model": "beta", "prompt": "I", "temperature": "hot"}):
        response = httpx.post(f"{guarded.base_url}/v1/completions", json=body)
        assert response.status_code == 401, response.text


def test_rejections_counted_without_hidden_names(guarded) -> None:
    before = rejected_counts(guarded)
    body = {"model": "beta", "prompt": "I", "max_tokens": 2}
    assert httpx.post(f"{guarded.base_url}/v1/completions", json=body).status_code == 401
    # tenant-a may not use beta: the 404 must not name beta in a label either.
    assert httpx.post(f"{guarded.base_url}/v1/completions", json=body, headers=_headers(TENANT_A)).status_code == 404
    after = rejected_counts(guarded)
    assert increase(before, after) == {("401", "unknown"): 1.0, ("404", "unknown"): 1.0}
    assert all(task != "beta" for _, task in after)
