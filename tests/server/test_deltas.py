"""Registering, listing, serving and deleting deltas while the server runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from deltastore.checkpoint import Checkpoint
from deltastore.format import DenseEntry, SparseEntry, StructuredEntry, read_delta, write_delta
from tests.server.conftest import BASE_ID, FOREIGN_FINGERPRINT
from tests.server.support import LiveServer, greedy_text, make_delta, reference_model


def _client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def _upload(live: LiveServer, task: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{live.base_url}/v1/deltas", params={"task": task}, content=data,
        headers={"content-type": "application/octet-stream"}, timeout=60,
    )


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def _store_files(live: LiveServer) -> set[str]:
    return {path.name for path in live.store.iterdir()}


def test_register_serve_delete_roundtrip(live, delta_files, references, tokenizer) -> None:
    client = _client(live)
    prompt_ids = tokenizer("What is two plus two?")["input_ids"]
    expected, _ = greedy_text(references["gamma"], tokenizer, prompt_ids, max_tokens=14)

    # 1. Register: the delta is verified, stored and listed.
    response = _upload(live, "gamma", delta_files["gamma"].read_bytes())
    assert response.status_code == 201, response.text
    assert response.json()["task"] == "gamma"
    assert response.json()["nnz"] > 0
    assert "gamma" in {m.id for m in client.models.list().data}
    assert "gamma" in {d["task"] for d in httpx.get(f"{live.base_url}/v1/deltas").json()["data"]}
    assert "gamma.delta.safetensors" in _store_files(live)

    # 2. Serve it, equal to the plain model with its reconstructed weights.
    result = client.completions.create(model="gamma", prompt="What is two plus two?", max_tokens=14, temperature=0)
    assert result.choices[0].text == expected

    # 3. Delete: gone from the listing, the folder and the API.
    deleted = httpx.delete(f"{live.base_url}/v1/deltas/gamma")
    assert deleted.status_code == 200
    assert deleted.json()["deleted"] is True
    assert "gamma" not in {m.id for m in client.models.list().data}
    assert "gamma.delta.safetensors" not in _store_files(live)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt="I", max_tokens=3)
    _error(httpx.delete(f"{live.base_url}/v1/deltas/gamma"), 404)


def test_reregistered_name_serves_new_delta(live, delta_files, references, tokenizer) -> None:
    client = _client(live)
    prompt = "I love this phone"
    ids = tokenizer(prompt)["input_ids"]

    # The same name first serves gamma's delta, then (after a delete) beta's delta under the new name.
    assert _upload(live, "delta2", _renamed(delta_files["gamma"], "delta2")).status_code == 201
    first = client.completions.create(model="delta2", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert first == greedy_text(references["gamma"], tokenizer, ids, max_tokens=12)[0]
    assert httpx.delete(f"{live.base_url}/v1/deltas/delta2").status_code == 200

    assert _upload(live, "delta2", _renamed(delta_files["beta"], "delta2")).status_code == 201
    second = client.completions.create(model="delta2", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert second == greedy_text(references["beta"], tokenizer, ids, max_tokens=12)[0]
    assert httpx.delete(f"{live.base_url}/v1/deltas/delta2").status_code == 200


def _renamed(path: Path, task: str) -> bytes:
    """Return the delta file's bytes rewritten under another task name (the checksum covers the name)."""
    delta = read_delta(path)
    out = path.parent / "renamed" / f"{task}.delta.safetensors"
    write_delta(
        out, task=task, base_fingerprint=delta.metadata.base_fingerprint, method=delta.metadata.method,
        params=delta.metadata.params, entries=delta.entries, value_dtype="float32",
    )
    return out.read_bytes()


def test_existing_name_409(live, delta_files) -> None:
    error = _error(_upload(live, "alpha", delta_files["alpha"].read_bytes()), 409)
    assert error["code"] == "task_exists"
    _error(_upload(live, BASE_ID, delta_files["alpha"].read_bytes()), 409)


@pytest.mark.parametrize("task", ["../escape", ".hidden", "a" * 65, "with space", "x..y"])
def test_invalid_task_name_400(live, delta_files, task: str) -> None:
    error = _error(_upload(live, task, delta_files["gamma"].read_bytes()), 400)
    assert error["param"] == "task"


def test_missing_task_parameter_400(live, delta_files) -> None:
    response = httpx.post(f"{live.base_url}/v1/deltas", content=delta_files["gamma"].read_bytes())
    assert _error(response, 400)["param"] == "task"


def test_empty_upload_400(live) -> None:
    _error(_upload(live, "empty", b""), 400)


def test_invalid_uploads_422_leave_no_file(live, delta_files, tiny_base, tiny_finetunes, tmp_path) -> None:
    good = delta_files["gamma"].read_bytes()
    foreign = make_delta(tiny_base, tiny_finetunes["alpha"], tmp_path, task="other", base_fingerprint=FOREIGN_FINGERPRINT)
    cases = {
        "garbage": (b"not a safetensors file at all", "invalid delta"),
        "truncated": (good[: len(good) // 2], "truncated"),
        "altered": (good[:-10] + bytes(b ^ 0xFF for b in good[-10:]), "checksum"),
        "other": (foreign.read_bytes(), "base"),
        "misnamed": (good, "metadata names task 'gamma'"),
        "wrongshape": (_wrong_shape_delta(live, tmp_path), "shape"),
    }
    before = _store_files(live)
    for task, (data, reason) in cases.items():
        error = _error(_upload(live, task, data), 422)
        assert reason in error["message"], (task, error["message"])
        assert task not in {m["id"] for m in httpx.get(f"{live.base_url}/v1/models").json()["data"]}
    assert _store_files(live) == before


def _wrong_shape_delta(live: LiveServer, tmp_path: Path) -> bytes:
    path = tmp_path / "wrongshape.delta.safetensors"
    write_delta(
        path, task="wrongshape", base_fingerprint=live.runtime.base_fingerprint, method="dare", params={},
        entries={"model.norm.weight": DenseEntry(shape=(7,), values=torch.ones(7))},
    )
    return path.read_bytes()


def test_delete_base_400(live) -> None:
    _error(httpx.delete(f"{live.base_url}/v1/deltas/{BASE_ID}"), 400)


def test_delete_unknown_404(live) -> None:
    _error(httpx.delete(f"{live.base_url}/v1/deltas/never-registered"), 404)


def test_upload_too_large_413(live, delta_files) -> None:
    data = delta_files["gamma"].read_bytes()
    settings = live.runtime.settings
    limit = settings.max_upload_bytes
    settings.max_upload_bytes = len(data) - 1
    try:
        # Declared by Content-Length, and found while streaming a chunked body that declares nothing.
        _error(_upload(live, "huge", data), 413)
        chunked = httpx.post(
            f"{live.base_url}/v1/deltas", params={"task": "huge"},
            content=iter([data[:1000], data[1000:]]), headers={"content-type": "application/octet-stream"},
        )
        _error(chunked, 413)
    finally:
        settings.max_upload_bytes = limit
    assert not any(name.startswith(".upload-") for name in _store_files(live))


def test_delete_with_requests_in_flight(live, delta_files, references, tokenizer) -> None:
    # Many queued requests for one task, then a delete: each either completes on the task's
    # weights or fails with 404; none runs on other weights, and later requests get 404.
    assert _upload(live, "doomed", _renamed(delta_files["gamma"], "doomed")).status_code == 201
    prompts = ["I", "The quick brown fox", "0 1 2 3", "Terrible service"] * 5
    expected = {p: greedy_text(references["gamma"], tokenizer, tokenizer(p)["input_ids"], max_tokens=30)[0] for p in set(prompts)}
    client = openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(prompt: str) -> str | None:
        try:
            result = await client.completions.create(model="doomed", prompt=prompt, max_tokens=30, temperature=0)
        except openai.NotFoundError:
            return None
        return result.choices[0].text

    async def run() -> list[str | None]:
        try:
            tasks = [asyncio.create_task(one(p)) for p in prompts]
            await asyncio.sleep(0.05)
            async with httpx.AsyncClient() as http:
                assert (await http.delete(f"{live.base_url}/v1/deltas/doomed")).status_code == 200
            return await asyncio.gather(*tasks)
        finally:
            await client.close()

    outputs = asyncio.run(run())
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output is None or output == expected[prompt], prompt
    with pytest.raises(openai.NotFoundError):
        _client(live).completions.create(model="doomed", prompt="I", max_tokens=3)
    # The base is intact after the deleted task's batch finished.
    base = _client(live).completions.create(model=BASE_ID, prompt="I", max_tokens=8, temperature=0).choices[0].text
    assert base == greedy_text(references[BASE_ID], tokenizer, tokenizer("I")["input_ids"], max_tokens=8)[0]


def test_file_copied_into_store_is_served(live, delta_files, references, tokenizer) -> None:
    target = live.store / "late.delta.safetensors"
    target.write_bytes(_renamed(delta_files["gamma"], "late"))
    try:
        result = _client(live).completions.create(model="late", prompt="I", max_tokens=9, temperature=0)
        assert result.choices[0].text == greedy_text(references["gamma"], tokenizer, tokenizer("I")["input_ids"], max_tokens=9)[0]
    finally:
        httpx.delete(f"{live.base_url}/v1/deltas/late")


def test_listing_json_shape(live) -> None:
    data = httpx.get(f"{live.base_url}/v1/deltas").json()
    assert data["object"] == "list"
    alpha = next(d for d in data["data"] if d["task"] == "alpha")
    assert alpha["base_fingerprint"] == live.runtime.base_fingerprint
    assert alpha["file_bytes"] == (live.store / "alpha.delta.safetensors").stat().st_size
    assert json.loads(json.dumps(alpha))["params"]["drop_rate"] == pytest.approx(0.4)


def test_structured_int8_delta_served(live, tiny_base, tiny_finetunes, tokenizer, tmp_path) -> None:
    # Whole rows of q_proj, whole columns of down_proj, int8 values: every stored kind but dense.
    base, finetune = Checkpoint.open(tiny_base), Checkpoint.open(tiny_finetunes["alpha"])
    entries = {}
    for name in base.names:
        delta = finetune.get(name).float() - base.get(name).float()
        if name.endswith("q_proj.weight"):
            rows = torch.tensor([0, 5, 17, 30])
            entries[name] = StructuredEntry(shape=tuple(delta.shape), axis=0, indices=rows, values=delta[rows])
        elif name.endswith("down_proj.weight"):
            columns = torch.tensor([1, 2, 40, 87])
            entries[name] = StructuredEntry(shape=tuple(delta.shape), axis=1, indices=columns, values=delta[:, columns])
        elif name.endswith("up_proj.weight"):
            flat = delta.reshape(-1)
            indices = torch.arange(0, flat.numel(), 3)
            entries[name] = SparseEntry(shape=tuple(delta.shape), indices=indices, values=flat[indices])
    path = tmp_path / "lines.delta.safetensors"
    write_delta(
        path, task="lines", base_fingerprint=live.runtime.base_fingerprint, method="structured", params={},
        entries=entries, value_dtype="int8",
    )
    assert _upload(live, "lines", path.read_bytes()).status_code == 201
    try:
        reference = reference_model(tiny_base, path)
        for prompt in ("The quick brown fox", "I love this phone"):
            expected = greedy_text(reference, tokenizer, tokenizer(prompt)["input_ids"], max_tokens=12)[0]
            result = _client(live).completions.create(model="lines", prompt=prompt, max_tokens=12, temperature=0)
            assert result.choices[0].text == expected, prompt
    finally:
        httpx.delete(f"{live.base_url}/v1/deltas/lines")
