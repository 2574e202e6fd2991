"""GET /v1/models/{model} under API keys: a tenant reaches only its own models and learns of no others."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import BASE_ID
from tests.server.test_auth import ADMIN, TENANT_A, TENANT_B, guarded  # noqa: F401 (guarded is a fixture)


def _client(key: str, server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize(
    ("key", "allowed"), [(TENANT_A, {BASE_ID, "alpha"}), (TENANT_B, {"beta"}), (ADMIN, {BASE_ID, "alpha", "beta"})]
)
def test_retrieve_follows_key_tasks(guarded, key: str, allowed: set[str]) -> None:  # noqa: F811
    client = _client(key, guarded)
    listed = {m.id for m in client.models.list().data}
    assert listed == allowed
    for model in (BASE_ID, "alpha", "beta"):
        if model in allowed:
            assert client.models.retrieve(model).id == model
        else:
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve(model)


def test_hidden_model_looks_unknown(guarded) -> None:  # noqa: F811
    headers = {"Authorization": f"Bearer {TENANT_B}"}
    hidden = httpx.get(f"{guarded.base_url}/v1/models/alpha", headers=headers)
    unknown = httpx.get(f"{guarded.base_url}/v1/models/zeta", headers=headers)
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"]["code"] == unknown.json()["error"]["code"] == "model_not_found"
    assert hidden.json()["error"]["message"] == unknown.json()["error"]["message"].replace("'zeta'", "'alpha'")


@pytest.mark.parametrize("authorization", [None, "Bearer sk-not-a-configured-key-000"])
def test_retrieve_needs_valid_key(guarded, authorization: str | None) -> None:  # noqa: F811
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.get(f"{guarded.base_url}/v1/models/alpha", headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["type"] == "authentication_error"


def test_delete_without_task_needs_admin(guarded) -> None:  # noqa: F811
    response = httpx.delete(f"{guarded.base_url}/v1/deltas/", headers={"Authorization": f"Bearer {TENANT_A}"})
    assert response.status_code == 403, response.text
    response = httpx.delete(f"{guarded.base_url}/v1/deltas/", headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 400, response.text
    assert "task name is missing" in response.json()["error"]["message"]
