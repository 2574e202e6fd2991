"""Bad input gets OpenAI-shaped errors with the right status, never a 500."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server.errors import plural
from tests.server.conftest import BASE_ID
from tests.server.support import LiveServer


def _client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["code"], error  # every error carries a stable code
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


# -- wrong JSON types, hostile values and the unknown-field policy -----------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "hot"),
        ("temperature", True),
        ("top_p", "0.5"),
        ("top_p", -0.1),
        ("max_tokens", "5"),
        ("max_tokens", 2.5),
        ("max_tokens", 2.0),
        ("max_tokens", True),
        ("max_tokens", 1e400),
        ("n", "2"),
        ("stream", "yes"),
        ("stream", 1),
        ("stop", 5),
        ("stop", [1, 2]),
        ("stop", {"a": "b"}),
        ("seed", "1"),
        ("seed", 1.5),
        ("seed", 10**30),
        ("seed", -(2**64)),
        ("echo", "true"),
        ("ignore_eos", None),
        ("stream_options", {"include_usage": "yes"}),
        ("model", 5),
        ("model", None),
        ("prompt", {"text": "I"}),
        ("prompt", [1, 2, 3]),
        ("prompt", None),
    ],
)
def test_wrong_types_400(live, field: str, value) -> None:
    body = {"model": BASE_ID, "prompt": "I", "max_tokens": 2, field: value}
    raw = json.dumps(body).replace("Infinity", "1e400")
    error = _assert_openai_error(_post_raw(live, "/v1/completions", raw), 400)
    assert error["param"] is not None
    assert error["param"].split(".")[0] == field


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "text", "text": 7}]}],
        [{"role": "user", "content": [{"text": "no type"}]}],
        [{"role": 1, "content": "x"}],
        [None],
    ],
)
def test_chat_wrong_types_400(live, messages) -> None:
    response = httpx.post(f"{live.base_url}/v1/chat/completions", json={"model": BASE_ID, "messages": messages})
    _assert_openai_error(response, 400)


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe not utf-8",
        b'"just a string"',
        b"null",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "tiny-base", "prompt": "I", "max_tokens": 2',
        b"",
    ],
)
def test_unparsable_bodies_400(live, body: bytes) -> None:
    response = httpx.post(f"{live.base_url}/v1/completions", content=body, headers={"content-type": "application/json"})
    _assert_openai_error(response, 400)


def test_too_many_choices_400(live) -> None:
    body = {"model": BASE_ID, "prompt": ["a", "b", "c"], "n": 6, "max_tokens": 2}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body), 400)
    assert "18 choices" in error["message"]


def test_edge_seeds_served(live) -> None:
    for seed in (-(2**63), -1, 0, 2**63 - 17):
        body = {"model": BASE_ID, "prompt": "I", "max_tokens": 2, "seed": seed, "n": 16}
        response = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, (seed, response.text)


def test_unknown_fields_ignored(live) -> None:
    # Policy: fields this server does not know are ignored, because OpenAI clients send extras
    # such as `user` and `metadata`. Unsupported sampling options are rejected instead (see above).
    body = {"model": BASE_ID, "prompt": "I", "max_tokens": 2, "user": "u-1", "metadata": {"k": "v"}, "x_custom": [1]}
    assert httpx.post(f"{live.base_url}/v1/completions", json=body).status_code == 200
    chat = {"model": BASE_ID, "messages": [{"role": "user", "content": "x", "name": "bob"}], "max_tokens": 2, "store": False}
    assert httpx.post(f"{live.base_url}/v1/chat/completions", json=chat).status_code == 200


def test_prompt_beyond_context_on_chat_400(live) -> None:
    messages = [{"role": "user", "content": "0 1 2 3 4 5 6 7 8 9 " * live.runtime.context_length}]
    response = httpx.post(f"{live.base_url}/v1/chat/completions", json={"model": "alpha", "messages": messages})
    assert _assert_openai_error(response, 400)["code"] == "context_length_exceeded"


# -- messages: plain words, the field, the bad value and a stable code ------------------------------


def test_missing_content_type_named(live) -> None:
    body = json.dumps({"model": BASE_ID, "prompt": "I", "max_tokens": 2}).encode()
    for headers in ({}, {"content-type": "text/plain"}):
        response = httpx.post(f"{live.base_url}/v1/completions", content=body, headers=headers)
        error = _assert_openai_error(response, 400)
        assert error["code"] == "invalid_content_type"
        assert "Content-Type: application/json" in error["message"]
        assert "dictionary" not in error["message"]


def test_invalid_json_code(live) -> None:
    error = _assert_openai_error(_post_raw(live, "/v1/completions", "{not json"), 400)
    assert error["code"] == "invalid_json"
    assert "not valid JSON" in error["message"]
    assert error["param"] is None


@pytest.mark.parametrize(("value", "shown"), [(5, "got 5"), ([1, 2], "got [1, 2]"), ({"a": 1}, 'got {"a": 1}')])
def test_union_field_named_once(live, value, shown: str) -> None:
    body = {"model": BASE_ID, "prompt": value, "max_tokens": 2}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body), 400)
    assert error["param"] == "prompt"
    assert error["code"] == "invalid_type"
    assert error["message"] == f"prompt must be a string or a list of strings, {shown}"


def test_missing_field_code(live) -> None:
    response = httpx.post(f"{live.base_url}/v1/completions", json={"model": BASE_ID})
    error = _assert_openai_error(response, 400)
    assert error["param"] == "prompt"
    assert error["code"] == "missing_field"
    assert "Field required" not in error["message"]
    assert "prompt is missing" in error["message"]


def test_several_invalid_fields_listed(live) -> None:
    body = {"prompt": 5, "temperature": "hot", "n": 0}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body), 400)
    message = error["message"]
    assert message.startswith("4 invalid fields: ")
    assert "(1) model is missing" in message
    assert '(2) temperature must be a number, got "hot".' in message
    assert "(3) n must be at least 1, got 0." in message
    assert "(4) prompt must be a string or a list of strings, got 5." in message
    assert "more errors" not in message
    assert error["param"] == "model"


def test_long_value_shortened(live) -> None:
    body = {"model": BASE_ID, "prompt": "I", "max_tokens": "x" * 500}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body), 400)
    assert "(502 characters)" in error["message"]
    assert len(error["message"]) < 200


def test_nested_field_path(live) -> None:
    body = {"model": BASE_ID, "messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages[1].role"
    assert '"wizard"' in error["message"]
    assert "'user'" in error["message"]


def test_unsupported_option_code(live) -> None:
    body = {"model": BASE_ID, "prompt": "I", "max_tokens": 2, "presence_penalty": 0.5}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body), 400)
    assert error["code"] == "unsupported_parameter"
    assert "got 0.5" in error["message"]


def test_too_many_choices_names_n(live) -> None:
    body = {"model": BASE_ID, "prompt": ["a", "b", "c"], "n": 6, "max_tokens": 2}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body), 400)
    assert error["param"] == "n"
    assert error["code"] == "too_many_choices"


def test_context_message_counts_tokens(live, tokenizer) -> None:
    prompt_tokens = len(tokenizer("I")["input_ids"])
    body = {"model": BASE_ID, "prompt": "I", "max_tokens": live.runtime.context_length}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body), 400)
    expected = "1 token" if prompt_tokens == 1 else f"{prompt_tokens} tokens"
    assert f"the prompt ({expected})" in error["message"]


def test_plural_forms() -> None:
    assert plural(1, "token") == "1 token"
    assert plural(0, "token") == "0 tokens"
    assert plural(2, "token") == "2 tokens"
    assert plural(2, "entry", "entries") == "2 entries"


# -- chat content, context window, unsupported options, path errors ---------------------------------


@pytest.mark.parametrize(
    ("message", "code"),
    [({"role": "user"}, "missing_field"), ({"role": "user", "content": None}, "invalid_type")],
    ids=["missing", "null"],
)
def test_chat_message_without_content_400(live, message: dict, code: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, message]
    body = {"model": BASE_ID, "messages": messages, "max_tokens": 2}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages[1].content"
    assert error["code"] == code
    assert error["message"].startswith("messages[1].content ")
    assert "no tool calls" in error["message"]


def test_assistant_message_without_content_400(live) -> None:
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}, {"role": "user", "content": "y"}]
    with pytest.raises(openai.BadRequestError) as caught:
        _client(live).chat.completions.create(model=BASE_ID, messages=messages, max_tokens=2)
    assert caught.value.body["param"] == "messages[1].content"


def _long_prompt(live: LiveServer) -> str:
    return "0 1 2 3 4 5 6 7 8 9 " * live.runtime.context_length


@pytest.mark.parametrize("max_tokens", [None, 1, 5])
def test_prompt_filling_window_says_shorten(live, tokenizer, max_tokens: int | None) -> None:
    context = live.runtime.context_length
    prompt = _long_prompt(live)
    body = {"model": BASE_ID, "prompt": prompt, **({} if max_tokens is None else {"max_tokens": max_tokens})}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=60), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"
    assert f"the prompt has {len(tokenizer(prompt)['input_ids'])} tokens" in error["message"]
    assert f"context window is {context} tokens" in error["message"]
    assert f"shorten the prompt to at most {context - 1} tokens" in error["message"]
    assert "max_tokens" not in error["message"]


def test_chat_prompt_filling_window_names_messages(live) -> None:
    messages = [{"role": "user", "content": _long_prompt(live)}]
    body = {"model": "alpha", "messages": messages, "max_completion_tokens": 4}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/chat/completions", json=body, timeout=60), 400)
    assert error["param"] == "messages"
    assert "shorten the prompt" in error["message"]
    assert "max_completion_tokens" not in error["message"]
    assert "at most 0" not in error["message"]


def test_max_tokens_advice_works(live, tokenizer) -> None:
    prompt = "The quick brown fox"
    body = {"model": BASE_ID, "prompt": prompt, "max_tokens": live.runtime.context_length, "temperature": 0}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body), 400)
    advised = int(error["message"].rsplit("at most ", 1)[1])
    assert advised == live.runtime.context_length - len(tokenizer(prompt)["input_ids"])
    response = httpx.post(f"{live.base_url}/v1/completions", json={**body, "max_tokens": advised}, timeout=120)
    assert response.status_code == 200, response.text


def test_chat_advice_names_max_completion_tokens(live) -> None:
    body = {
        "model": BASE_ID, "messages": [{"role": "user", "content": "x"}],
        "max_completion_tokens": live.runtime.context_length,
    }
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/chat/completions", json=body), 400)
    assert error["param"] == "max_completion_tokens"
    assert "lower max_completion_tokens to at most" in error["message"]


@pytest.mark.parametrize(("path", "value"), [("/v1/completions", 2), ("/v1/chat/completions", True)])
def test_logprobs_message_names_working_values(live, path: str, value) -> None:
    body = {"model": BASE_ID, "prompt": "I", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    error = _assert_openai_error(httpx.post(f"{live.base_url}{path}", json={**body, "logprobs": value}), 400)
    assert error["param"] == "logprobs"
    assert "leave it out of the request or send null or false" in error["message"]
    assert "send 0" not in error["message"]
    for working in (None, False):
        response = httpx.post(f"{live.base_url}{path}", json={**body, "logprobs": working}, timeout=60)
        assert response.status_code == 200, (working, response.text)


def test_penalty_message_names_zero(live) -> None:
    body = {"model": BASE_ID, "prompt": "I", "max_tokens": 2, "presence_penalty": 0.5}
    error = _assert_openai_error(httpx.post(f"{live.base_url}/v1/completions", json=body), 400)
    assert error["message"].endswith("leave it out of the request or send null or 0")


def test_delete_without_task_400(live) -> None:
    response = httpx.delete(f"{live.base_url}/v1/deltas/")
    error = _assert_openai_error(response, 400)
    assert error["param"] == "task"
    assert error["code"] == "missing_field"
    assert "task name is missing" in error["message"]
    assert "DELETE /v1/deltas/TASK" in error["message"]
    assert {entry.task for entry in live.runtime.store.tasks()} >= {"alpha", "beta"}
