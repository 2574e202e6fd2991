"""Bad input gets OpenAI-shaped errors with the right status, never a 500."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import BASE_ID
from tests.server.support import LiveServer


def _client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def _post_raw(live: LiveServer, path: str, body: str) -> httpx.Response:
    return httpx.post(f"{live.base_url}{path}", content=body.encode(), headers={"content-type": "application/json"})


def test_unknown_model_404(live) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _client(live).completions.create(model="no-such-task", prompt="I", max_tokens=3)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        _client(live).chat.completions.create(model="../etc", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "field",
    ['"temperature": NaN', '"temperature": Infinity', '"top_p": -Infinity', '"top_p": NaN', '"max_tokens": NaN'],
)
def test_nan_and_infinity_rejected(live, field: str) -> None:
    body = f'{{"model": "{BASE_ID}", "prompt": "I", {field}}}'
    error = _assert_openai_error(_post_raw(live, "/v1/completions", body), 400)
    assert error["param"] == field.split('"')[1]
    chat = f'{{"model": "alpha", "messages": [{{"role": "user", "content": "x"}}], {field}}}'
    _assert_openai_error(_post_raw(live, "/v1/chat/completions", chat), 400)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_values_400(live, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _client(live).completions.create(model=BASE_ID, prompt="I", **{"max_tokens": 3, **kwargs})
    assert caught.value.body["param"] == param


def test_context_window_exceeded_400(live) -> None:
    context = live.runtime.context_length
    with pytest.raises(openai.BadRequestError) as caught:
        _client(live).completions.create(model="alpha", prompt="The quick brown fox", max_tokens=context)
    assert caught.value.body["code"] == "context_length_exceeded"
    long_prompt = "0 1 2 3 4 5 6 7 8 9 " * context
    with pytest.raises(openai.BadRequestError) as caught:
        _client(live).completions.create(model="alpha", prompt=long_prompt)
    assert caught.value.body["code"] == "context_length_exceeded"


def test_prompt_filling_window_exactly_allowed(live, tokenizer) -> None:
    prompt = "The quick brown fox"
    room = live.runtime.context_length - len(tokenizer(prompt)["input_ids"])
    result = _client(live).completions.create(model=BASE_ID, prompt=prompt, max_tokens=room, temperature=0)
    assert result.usage.completion_tokens <= room


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        "[]",
        '{"model": "tiny-base"}',
        '{"model": "tiny-base", "prompt": []}',
        '{"model": "tiny-base", "prompt": 5}',
        '{"model": "", "prompt": "x"}',
        '{"model": "tiny-base", "prompt": "x", "stream_options": 3}',
    ],
)
def test_malformed_completion_bodies_400(live, body: str) -> None:
    _assert_openai_error(_post_raw(live, "/v1/completions", body), 400)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"content": "x"}],
    ],
)
def test_invalid_chat_messages_400(live, messages: list) -> None:
    response = httpx.post(f"{live.base_url}/v1/chat/completions", json={"model": "alpha", "messages": messages})
    _assert_openai_error(response, 400)


def test_empty_prompt_400(live) -> None:
    with pytest.raises(openai.BadRequestError):
        _client(live).completions.create(model=BASE_ID, prompt="", max_tokens=3)


def test_unknown_route_404_in_openai_shape(live) -> None:
    _assert_openai_error(httpx.get(f"{live.base_url}/v1/nothing-here"), 404)
    _assert_openai_error(httpx.get(f"{live.base_url}/v1/completions"), 405)


@pytest.mark.parametrize(
    ("field", "value"),
    [("logprobs", 2), ("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("best_of", 3), ("logit_bias", {"5": 10})],
)
def test_unsupported_options_400(live, field: str, value) -> None:
    response = httpx.post(
        f"{live.base_url}/v1/completions", json={"model": BASE_ID, "prompt": "I", "max_tokens": 2, field: value}
    )
    error = _assert_openai_error(response, 400)
    assert error["param"] == field
    assert "not supported" in error["message"]


def test_neutral_unsupported_values_accepted(live) -> None:
    body = {"model": BASE_ID, "prompt": "I", "max_tokens": 2, "logprobs": None, "presence_penalty": 0, "best_of": 1}
    assert httpx.post(f"{live.base_url}/v1/completions", json=body).status_code == 200


def test_queue_full_429(live) -> None:
    engine = live.runtime.engine
    limit = engine.max_queued_requests
    engine.max_queued_requests = 0
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            _client(live).completions.create(model=BASE_ID, prompt="I", max_tokens=2)
        assert caught.value.body["code"] == "queue_full"
    finally:
        engine.max_queued_requests = limit
