"""Fuzzing with hypothesis: random request bodies never get a 500, random delta bytes never escape as a crash.

Example counts are bounded: the request fuzzing (marked slow) takes about 75 s on two CPU cores,
the file fuzzing a few seconds.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from deltastore.apply import model_params
from deltastore.checkpoint import fingerprint
from deltastore.format import DeltaFormatError, read_delta
from server.store import UPLOAD_PREFIX, Store, TaskExists
from tests.server.conftest import BASE_ID
from tests.server.support import LiveServer

REQUEST_EXAMPLES = 150
CHAT_EXAMPLES = 100
FILE_EXAMPLES = 300
HTTP_FILE_EXAMPLES = 40

# -- request bodies -------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, 3, -1, 16, 17, 127, 128, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)

# Plausible values: a body built from these alone is valid, or names a model that is not served.
_VALID = {
    "max_tokens": st.sampled_from([1, 2, 3]),
    "temperature": st.sampled_from([0, 0.0, 0.7, 1, 2.0]),
    "top_p": st.sampled_from([1, 1.0, 0.5, 1e-9]),
    "n": st.integers(min_value=1, max_value=3),
    "stop": st.none() | st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "seed": st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 17),
    "stream": st.booleans(),
    "echo": st.booleans(),
    "ignore_eos": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.sampled_from([None, False, 0]),
    "best_of": st.sampled_from([None, 1]),
    "user": st.text(max_size=8),
}
_MODELS = st.sampled_from([BASE_ID, "alpha", "beta"] * 3 + ["foreign", "nope", "ALPHA", "../alpha"])
_PROMPTS = st.text(min_size=1, max_size=40) | st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3)
_ROLES = st.sampled_from(["system", "user", "assistant", "developer"])
_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": _ROLES, "content": st.text(max_size=30) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}), max_size=2)}
    ),
    min_size=1, max_size=3,
)


@st.composite
def _bodies(draw, required: dict, *, bad_fields: list[str]):
    """A body of plausible values; half the time one field gets an arbitrary JSON value, rarely the whole body."""
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return draw(_json)
    body = draw(st.fixed_dictionaries(required, optional=_VALID))
    if draw(st.booleans()):
        body[draw(st.sampled_from(bad_fields))] = draw(_json)
    return body


def _completion_bodies():
    return _bodies({"model": _MODELS, "prompt": _PROMPTS}, bad_fields=["model", "prompt", *_VALID])


def _chat_bodies():
    return _bodies({"model": _MODELS, "messages": _MESSAGES}, bad_fields=["model", "messages", *_VALID])


def _post(live: LiveServer, path: str, body) -> httpx.Response:
    # allow_nan: Python's JSON parser on the server reads NaN and Infinity, so clients can send them.
    return httpx.post(
        f"{live.base_url}{path}", content=json.dumps(body, allow_nan=True).encode(),
        headers={"content-type": "application/json"}, timeout=120,
    )


def _check_response(response: httpx.Response) -> None:
    event(f"status {response.status_code}")
    assert response.status_code < 500, response.text
    if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in response.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in lines), response.text
    elif response.status_code == 200:
        assert response.json()["choices"]
    else:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture
def short_completions(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    # Valid bodies that set no max_tokens generate 2 tokens, to keep examples fast.
    monkeypatch.setattr(live.runtime.settings, "max_tokens_default", 2)
    return live


@pytest.mark.slow
@settings(max_examples=REQUEST_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_completion_bodies())
def test_completion_bodies_never_500(short_completions, body) -> None:
    _check_response(_post(short_completions, "/v1/completions", body))


@pytest.mark.slow
@settings(max_examples=CHAT_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_chat_bodies())
def test_chat_bodies_never_500(short_completions, body) -> None:
    _check_response(_post(short_completions, "/v1/chat/completions", body))


# -- delta-file bytes -----------------------------------------------------------------------


@st.composite
def _mutated(draw, good: bytes) -> bytes:
    """Change `good` by flips, overwrites, cuts or insertions, mostly inside its header."""
    (header_length,) = struct.unpack("<Q", good[:8])
    data = bytearray(good)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "length"]))
        in_header = draw(st.booleans())
        limit = min(len(data), 8 + header_length) if in_header else len(data)
        position = draw(st.integers(min_value=0, max_value=max(limit - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16) | st.sampled_from([b"0", b"9", b"-", b"]", b"}", b'"', b"e9", b"NaN"]))
            data[position : position + len(chunk)] = chunk
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[:8] = struct.pack("<Q", draw(st.integers(min_value=0, max_value=2**64 - 1)))
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_store(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    params = model_params(AutoModelForCausalLM.from_pretrained(tiny_base))
    return Store(
        tmp_path_factory.mktemp("fuzz-store"), base_fingerprint=fingerprint(tiny_base), params=params,
        reserved=frozenset({BASE_ID}),
    )


@pytest.fixture(scope="module")
def good_delta(delta_files: dict[str, Path]) -> bytes:
    return delta_files["gamma"].read_bytes()


def test_file_fuzz_rejects_or_registers_valid(fuzz_store: Store, good_delta: bytes) -> None:
    outcomes = {"rejected": 0, "registered": 0}

    @settings(max_examples=FILE_EXAMPLES, deadline=None)
    @given(data=_mutated(good_delta))
    def check(data: bytes) -> None:
        fd, upload = fuzz_store.new_upload()
        with open(fd, "wb") as handle:
            handle.write(data)
        try:
            entry = fuzz_store.register("gamma", upload)
        except (DeltaFormatError, TaskExists):
            outcomes["rejected"] += 1
            event("rejected")
        else:
            # A change that survives every check must leave a file that reads back in full.
            outcomes["registered"] += 1
            event("registered")
            read_delta(entry.path, expected_fingerprint=fuzz_store.base_fingerprint)
            fuzz_store.delete("gamma")
        assert not any(p.name.startswith(UPLOAD_PREFIX) for p in fuzz_store.folder.iterdir())
        assert fuzz_store.tasks() == []

    check()
    assert outcomes["rejected"] > FILE_EXAMPLES // 2


@settings(max_examples=HTTP_FILE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_file_fuzz_over_http_never_500(live, delta_files, data) -> None:
    good = delta_files["gamma"].read_bytes()
    body = data.draw(_mutated(good))
    response = httpx.post(
        f"{live.base_url}/v1/deltas", params={"task": "gamma"}, content=body,
        headers={"content-type": "application/octet-stream"}, timeout=60,
    )
    assert response.status_code in (201, 400, 409, 422), response.text
    if response.status_code == 201:
        assert httpx.delete(f"{live.base_url}/v1/deltas/gamma").status_code == 200
    event(f"status {response.status_code}")
