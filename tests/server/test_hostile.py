"""Hostile delta files and task names: each upload is a clear 4xx, and the other tasks keep serving.

The files are built from a valid delta by changing one thing. Where the change is inside the
arrays, the checksum is computed again, so the check that must catch it is the one named in the
case, not the checksum.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as load_arrays
from safetensors.torch import save as save_arrays

from deltastore.format import MAX_HEADER_BYTES, METADATA_KEY, DeltaMetadata, TensorInfo, _checksum
from tests.server.conftest import BASE_ID, FOREIGN_FINGERPRINT
from tests.server.support import LiveServer

SPARSE = "model.layers.0.self_attn.q_proj.weight"  # (48, 48): one block of 2304 positions
DENSE = "model.norm.weight"  # (48,)


@dataclass
class Parts:
    """A delta file taken apart: its arrays and its deltamux metadata record."""

    arrays: dict[str, torch.Tensor]
    record: dict


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


def _parts(data: bytes) -> Parts:
    header, _ = _split(data)
    return Parts(arrays=dict(load_arrays(data)), record=json.loads(header["__metadata__"][METADATA_KEY]))


def _metadata(record: dict) -> DeltaMetadata:
    tensors = {name: TensorInfo(**{**info, "shape": tuple(info["shape"])}) for name, info in record["tensors"].items()}
    return DeltaMetadata(**{**record, "tensors": tensors})


def _assemble(parts: Parts, *, checksum: bool = True) -> bytes:
    record = copy.deepcopy(parts.record)
    if checksum:
        record["payload_sha256"] = _checksum(_metadata(record), parts.arrays)
    return save_arrays(parts.arrays, metadata={METADATA_KEY: json.dumps(record, sort_keys=True)})


def _edit(change: Callable[[Parts], None], *, checksum: bool = True) -> Callable[[bytes], bytes]:
    def build(good: bytes) -> bytes:
        parts = _parts(good)
        change(parts)
        return _assemble(parts, checksum=checksum)

    return build


def _edit_header(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def build(good: bytes) -> bytes:
        header, payload = _split(good)
        change(header)
        return _join(header, payload)

    return build


# -- the changes ----------------------------------------------------------------------------


def _set_value(key: str, position: int, value: float) -> Callable[[Parts], None]:
    def change(parts: Parts) -> None:
        array = parts.arrays[key].clone()
        array.view(-1)[position] = value
        parts.arrays[key] = array

    return change


def _offset_out_of_range(parts: Parts) -> None:
    offsets = parts.arrays[f"{SPARSE}:offsets"].clone()
    offsets[-1] = -1  # read as unsigned: 65535, past the tensor's 2304 positions
    parts.arrays[f"{SPARSE}:offsets"] = offsets


def _offsets_unsorted(parts: Parts) -> None:
    offsets = parts.arrays[f"{SPARSE}:offsets"].clone()
    offsets[[0, 1]] = offsets[[1, 0]]
    parts.arrays[f"{SPARSE}:offsets"] = offsets


def _counts_off_by_one(parts: Parts) -> None:
    parts.arrays[f"{SPARSE}:counts"] = parts.arrays[f"{SPARSE}:counts"] + 1


def _values_as_float32(parts: Parts) -> None:
    parts.arrays[f"{SPARSE}:values"] = parts.arrays[f"{SPARSE}:values"].float()


def _dense_as_float16(parts: Parts) -> None:
    parts.arrays[f"{DENSE}:dense"] = parts.arrays[f"{DENSE}:dense"].half()


def _record(**fields) -> Callable[[Parts], None]:
    def change(parts: Parts) -> None:
        parts.record.update(fields)

    return change


def _tensor_info(**fields) -> Callable[[Parts], None]:
    def change(parts: Parts) -> None:
        parts.record["tensors"][SPARSE].update(fields)

    return change


def _rename_tensor(new_name: str) -> Callable[[Parts], None]:
    """Move SPARSE's arrays and metadata to a tensor name the tiny model lacks."""

    def change(parts: Parts) -> None:
        for role in ("counts", "offsets", "values"):
            parts.arrays[f"{new_name}:{role}"] = parts.arrays.pop(f"{SPARSE}:{role}")
        parts.record["tensors"][new_name] = parts.record["tensors"].pop(SPARSE)

    return change


def _transposed_shape(parts: Parts) -> None:
    # gate_proj is (88, 48); (48, 88) has the same size, so only the model's shape can catch it.
    name = "model.layers.0.mlp.gate_proj.weight"
    parts.record["tensors"][name]["shape"] = [48, 88]


def _overlap(header: dict) -> None:
    keys = sorted((k for k in header if k.endswith(":counts")), key=lambda k: header[k]["data_offsets"][0])
    header[keys[1]]["data_offsets"] = list(header[keys[0]]["data_offsets"])  # same 4 bytes twice


def _past_end(header: dict) -> None:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + (1 << 20), end + (1 << 20)]


def _float64_array(header: dict) -> None:
    header[f"{SPARSE}:counts"]["dtype"] = "F64"


def _negative_shape(header: dict) -> None:
    header[f"{SPARSE}:counts"]["shape"] = [-1]


def _no_deltamux_metadata(good: bytes) -> bytes:
    return save_arrays({"weight": torch.zeros(3)})


def _raw_header(length: int, header: bytes) -> Callable[[bytes], bytes]:
    return lambda good: struct.pack("<Q", length) + header + good[8:]


@dataclass(frozen=True)
class Case:
    build: Callable[[bytes], bytes]
    reason: str  # a fragment of the expected error message


FILE_CASES: dict[str, Case] = {
    # The safetensors container.
    "header-oversized": Case(_raw_header(MAX_HEADER_BYTES + 1, b""), "limit"),
    "header-past-end": Case(lambda good: struct.pack("<Q", len(good)) + good[8:], "truncated"),
    "header-huge-length": Case(_raw_header(2**63, b""), "limit"),
    "header-not-json": Case(_raw_header(10, b"{notjson!!"), "not valid JSON"),
    "header-not-object": Case(_raw_header(2, b"[]"), "not a JSON object"),
    "arrays-overlap": Case(_edit_header(_overlap), "overlap"),
    "array-past-end": Case(_edit_header(_past_end), "past the end"),
    "array-float64": Case(_edit_header(_float64_array), "never use"),
    "array-negative-shape": Case(_edit_header(_negative_shape), "invalid shape"),
    "payload-truncated": Case(lambda good: good[:-100], "past the end"),
    "too-short": Case(lambda good: good[:7], "too short"),
    "not-a-delta": Case(_no_deltamux_metadata, "not a deltamux delta"),
    # The metadata.
    "format-version-2": Case(_edit(_record(format_version=2)), "format version"),
    "foreign-base": Case(_edit(_record(base_fingerprint=FOREIGN_FINGERPRINT)), "base"),
    "task-with-path": Case(_edit(_record(task="../../etc/passwd")), "invalid"),
    "unknown-value-dtype": Case(_edit(_tensor_info(value_dtype="float64")), "value dtype"),
    "unknown-kind": Case(_edit(_tensor_info(kind="lowrank")), "unknown kind"),
    "nnz-over-size": Case(_edit(_tensor_info(nnz=10**9)), "nnz"),
    "scale-nan": Case(_edit(_tensor_info(scale=math.nan)), "scale"),
    "scale-negative": Case(_edit(_tensor_info(scale=-1.0)), "scale"),
    # The model it must fit.
    "other-architecture-name": Case(_edit(_rename_tensor("model.layers.7.mlp.up_proj.weight")), "another architecture"),
    "other-architecture-shape": Case(_edit(_transposed_shape), "shape"),
    "values-wrong-dtype": Case(_edit(_values_as_float32), "expected F16"),
    "dense-wrong-dtype": Case(_edit(_dense_as_float16), "expected F32"),
    # The arrays, with a valid checksum.
    "index-out-of-range": Case(_edit(_offset_out_of_range), "outside"),
    "indices-unsorted": Case(_edit(_offsets_unsorted), "unsorted"),
    "counts-mismatch": Case(_edit(_counts_off_by_one), "add up"),
    "values-nan": Case(_edit(_set_value(f"{SPARSE}:values", 3, math.nan)), "NaN"),
    "values-inf": Case(_edit(_set_value(f"{SPARSE}:values", 5, math.inf)), "infinite"),
    "dense-nan": Case(_edit(_set_value(f"{DENSE}:dense", 0, math.nan)), "NaN"),
    "dense-neg-inf": Case(_edit(_set_value(f"{DENSE}:dense", 1, -math.inf)), "infinite"),
    # The same change without a new checksum.
    "altered-value": Case(_edit(_set_value(f"{SPARSE}:values", 0, 0.5), checksum=False), "checksum"),
}

BAD_NAMES = [
    "a/b", "../x", "..", "/etc/passwd", "a\\b", ".hidden", "x..y", "a" * 65, "-dash", "with space", "nul\x00x",
    "%2e%2e%2fetc", "ta\u0161k", "./alpha",
]


@dataclass(frozen=True)
class Upload:
    task: str
    data: bytes
    status: int
    reason: str


def _upload(live: LiveServer, task: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{live.base_url}/v1/deltas", params={"task": task}, content=data,
        headers={"content-type": "application/octet-stream"}, timeout=60,
    )


def _store_files(live: LiveServer) -> set[str]:
    return {path.name for path in live.store.iterdir()}


def _good_bytes(delta_files: dict[str, Path], task: str) -> bytes:
    return delta_files["gamma"].read_bytes() if task == "gamma" else _renamed(delta_files["gamma"].read_bytes(), task)


def _renamed(good: bytes, task: str) -> bytes:
    return _edit(_record(task=task))(good)


def test_rebuilt_valid_file_accepted(live, delta_files) -> None:
    # The builders must not break a file on their own: unchanged parts with a new checksum register.
    data = _renamed(delta_files["gamma"].read_bytes(), "rebuilt")
    response = _upload(live, "rebuilt", data)
    assert response.status_code == 201, response.text
    assert httpx.delete(f"{live.base_url}/v1/deltas/rebuilt").status_code == 200


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_hostile_file_422(live, delta_files, case: str) -> None:
    task = f"bad-{case}"
    data = FILE_CASES[case].build(_renamed(delta_files["gamma"].read_bytes(), task))
    before = _store_files(live)
    response = _upload(live, task, data)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_delta"
    assert FILE_CASES[case].reason in error["message"], error["message"]
    assert ".upload-" not in error["message"]
    assert _store_files(live) == before
    assert task not in {m["id"] for m in httpx.get(f"{live.base_url}/v1/models").json()["data"]}


@pytest.mark.parametrize("task", BAD_NAMES)
def test_hostile_task_name_400(live, delta_files, task: str) -> None:
    before = _store_files(live)
    response = _upload(live, task, delta_files["gamma"].read_bytes())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "task"
    assert _store_files(live) == before


@pytest.mark.parametrize("task", BAD_NAMES)
def test_hostile_model_name_404(live, task: str) -> None:
    response = httpx.post(f"{live.base_url}/v1/completions", json={"model": task, "prompt": "I", "max_tokens": 2})
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


def test_base_name_upload_409(live, delta_files) -> None:
    response = _upload(live, BASE_ID, delta_files["gamma"].read_bytes())
    assert response.status_code == 409


def test_symlink_out_of_store_not_served(live, delta_files, tmp_path) -> None:
    # A valid delta outside the store, linked into it under a task's file name.
    outside = tmp_path / "outside.delta.safetensors"
    outside.write_bytes(_renamed(delta_files["gamma"].read_bytes(), "linked"))
    link = live.store / "linked.delta.safetensors"
    os.symlink(outside, link)
    try:
        response = httpx.post(f"{live.base_url}/v1/completions", json={"model": "linked", "prompt": "I", "max_tokens": 2})
        assert response.status_code == 404, response.text
        assert "linked" not in {m["id"] for m in httpx.get(f"{live.base_url}/v1/models").json()["data"]}
        assert httpx.delete(f"{live.base_url}/v1/deltas/linked").status_code == 404
        # A rescan (as at start-up) skips the link as well.
        live.runtime.store.scan()
        assert "linked" not in {entry.task for entry in live.runtime.store.tasks()}
        assert outside.exists()
    finally:
        link.unlink()
        live.runtime.store.scan()


def _bad_uploads(delta_files: dict[str, Path], count: int) -> list[Upload]:
    """`count` bad uploads, cycling through the bad files and the bad names."""
    good = delta_files["gamma"].read_bytes()
    pool: list[Upload] = []
    for name in sorted(FILE_CASES):
        task = f"bad-{name}"
        pool.append(Upload(task, FILE_CASES[name].build(_renamed(good, task)), 422, FILE_CASES[name].reason))
    pool += [Upload(name, good, 400, "invalid task name") for name in BAD_NAMES]
    return [pool[i % len(pool)] for i in range(count)]


def test_fifty_bad_uploads_while_serving(live, delta_files) -> None:
    prompts = {BASE_ID: "The quick brown fox", "alpha": "What is two plus two?", "beta": "Translate to French:"}

    def greedy(model: str) -> str:
        body = {"model": model, "prompt": prompts[model], "max_tokens": 12, "temperature": 0}
        response = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    expected = {model: greedy(model) for model in prompts}
    uploads = _bad_uploads(delta_files, 50)
    before = _store_files(live)

    # Good traffic on every task runs until every bad upload has its response.
    stop = threading.Event()
    served: list[tuple[str, str]] = []

    def good_traffic(model: str) -> None:
        while not stop.is_set():
            served.append((model, greedy(model)))

    with ThreadPoolExecutor(max_workers=6) as pool:
        clients = [pool.submit(good_traffic, model) for model in prompts]
        attacks = [pool.submit(_upload, live, upload.task, upload.data) for upload in uploads]
        responses = [attack.result() for attack in attacks]
        stop.set()
        for client in clients:
            client.result()

    for upload, response in zip(uploads, responses, strict=True):
        assert response.status_code == upload.status, (upload.task, response.text)
        assert upload.reason in response.json()["error"]["message"], (upload.task, response.text)
    assert len(served) >= len(prompts)
    for model, text in served:
        assert text == expected[model], model
    assert _store_files(live) == before
    assert {entry.task for entry in live.runtime.store.tasks()} >= {"alpha", "beta"}


# -- files that are no delta at all -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (bytes(range(256)) * 8, "2048 bytes of binary data starting with 00 01 02"),
        (b'{"model": "alpha", "weights": [1, 2, 3]}', "40 bytes of JSON text starting with"),
        (b"hello, this is a text file\n", "27 bytes of text starting with 'hello, this is a'"),
        (b"\x01", "1 byte of binary data"),
    ],
)
def test_non_delta_upload_explained(live, data: bytes, found: str) -> None:
    before = _store_files(live)
    response = _upload(live, "not-a-delta", data)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_delta"
    assert "the uploaded file is not a safetensors file, so it is not a deltamux delta file" in error["message"]
    assert found in error["message"], error["message"]
    assert "--drop-rate 0.99`, then upload DIR/TASK.delta.safetensors" in error["message"]
    assert "the limit is" not in error["message"]
    assert _store_files(live) == before


def test_checkpoint_upload_explained(live, tiny_base) -> None:
    response = _upload(live, "checkpoint", (tiny_base / "model.safetensors").read_bytes())
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "the uploaded file is a safetensors file but not a deltamux delta file" in message
    assert "no 'deltamux' metadata" in message
    assert "--drop-rate 0.99`, then upload DIR/TASK.delta.safetensors" in message


def test_empty_upload_explained(live) -> None:
    response = _upload(live, "empty", b"")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_delta"
    assert "the request body is empty (0 bytes), so it is not a deltamux delta file" in error["message"]
    assert "--drop-rate 0.99`, then upload DIR/TASK.delta.safetensors" in error["message"]
