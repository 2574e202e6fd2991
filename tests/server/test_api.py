"""The live server through the real `openai` client: per-task outputs, streaming, chat, concurrency."""

from __future__ import annotations

import asyncio
import random

import httpx
import openai
import pytest

from deltastore.apply import model_params
from tests.server.conftest import BASE_ID
from tests.server.support import LiveServer, greedy_text, reference_model, weights_hash

PROMPTS = ["The quick brown fox", "What is two plus two?", "I love this phone", "0 1 2 3", "Translate to French:"]


def _client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def _expected(references, tokenizer, model: str, prompt: str, max_tokens: int) -> str:
    return greedy_text(references[model], tokenizer, tokenizer(prompt)["input_ids"], max_tokens=max_tokens)[0]


@pytest.mark.parametrize("model", [BASE_ID, "alpha", "beta"])
def test_greedy_output_equals_reference(live, references, tokenizer, model: str) -> None:
    client = _client(live)
    for prompt in PROMPTS[:3]:
        result = client.completions.create(model=model, prompt=prompt, max_tokens=15, temperature=0)
        text, count = greedy_text(references[model], tokenizer, tokenizer(prompt)["input_ids"], max_tokens=15)
        assert result.choices[0].text == text, prompt
        assert result.usage.completion_tokens == count
        assert result.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
        assert result.usage.total_tokens == result.usage.prompt_tokens + count
        assert result.choices[0].finish_reason == ("length" if count == 15 else "stop")


def test_tasks_differ_from_base(live) -> None:
    client = _client(live)
    outputs = {
        model: [client.completions.create(model=model, prompt=p, max_tokens=15, temperature=0).choices[0].text for p in PROMPTS]
        for model in (BASE_ID, "alpha", "beta")
    }
    assert outputs["alpha"] != outputs[BASE_ID]
    assert outputs["beta"] != outputs[BASE_ID]
    assert outputs["alpha"] != outputs["beta"]


def test_streaming_equals_plain(live) -> None:
    client = _client(live)
    plain = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    stream = client.completions.create(
        model="alpha", prompt=PROMPTS[1], max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.choices[0].text
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # token by token, not one piece


def test_stream_ends_with_done(live) -> None:
    body = {"model": "beta", "prompt": "I", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_chat_equals_reference_with_template(live, references, tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected, count = greedy_text(references["beta"], tokenizer, ids, max_tokens=13)
    client = _client(live)
    result = client.chat.completions.create(model="beta", messages=messages, max_tokens=13, temperature=0)
    assert result.choices[0].message.content == expected
    assert result.choices[0].message.role == "assistant"
    assert result.usage.prompt_tokens == len(ids)
    assert result.usage.completion_tokens == count


def test_chat_streaming_equals_plain(live) -> None:
    client = _client(live)
    messages = [{"role": "user", "content": "Good morning"}]
    plain = client.chat.completions.create(model="alpha", messages=messages, max_tokens=17, temperature=0)
    chunks = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=17, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_stop_sequence_trimmed(live, references, tokenizer) -> None:
    full = _expected(references, tokenizer, "alpha", PROMPTS[0], 20)
    stop = next(full[i : i + 2] for i in range(3, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    client = _client(live)
    result = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    assert result.choices[0].text == full[: full.find(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_seed_reproducible(live) -> None:
    client = _client(live)
    first = client.completions.create(model="beta", prompt="I", max_tokens=12, temperature=0.9, top_p=0.9, seed=77)
    second = client.completions.create(model="beta", prompt="I", max_tokens=12, temperature=0.9, top_p=0.9, seed=77)
    assert first.choices[0].text == second.choices[0].text


def test_prompt_list_and_n(live, references, tokenizer) -> None:
    client = _client(live)
    result = client.completions.create(model=BASE_ID, prompt=PROMPTS[:2], n=2, max_tokens=9, temperature=0)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for choice in result.choices:
        assert choice.text == _expected(references, tokenizer, BASE_ID, PROMPTS[choice.index // 2], 9)
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS[:2])
    assert result.usage.prompt_tokens == prompt_tokens


def test_echo_prepends_prompt(live) -> None:
    client = _client(live)
    plain = client.completions.create(model="alpha", prompt="I", max_tokens=5, temperature=0)
    echoed = client.completions.create(model="alpha", prompt="I", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "I" + plain.choices[0].text


def test_models_lists_base_and_tasks(live) -> None:
    models = {m.id: m for m in _client(live).models.list().data}
    assert {BASE_ID, "alpha", "beta"} <= set(models)
    assert "foreign" not in models  # made for another base: skipped at start-up
    delta = models["alpha"].model_extra["delta"]
    assert delta["method"] == "dare"
    assert delta["nnz"] > 0
    assert delta["params"]["seed"] == 11
    assert models[BASE_ID].model_extra["delta"] is None


@pytest.mark.parametrize("model", [BASE_ID, "alpha", "beta"])
def test_models_retrieve_equals_list_entry(live, model: str) -> None:
    client = _client(live)
    listed = {m.id: m for m in client.models.list().data}
    retrieved = client.models.retrieve(model)
    assert retrieved.id == model
    assert retrieved.object == "model"
    assert retrieved.model_dump() == listed[model].model_dump()


@pytest.mark.parametrize("model", ["no-such-task", "foreign", "org/no-such-model"])
def test_models_retrieve_unknown_404(live, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _client(live).models.retrieve(model)
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["type"] == "not_found_error"
    assert caught.value.body["param"] == "model"
    assert repr(model) in caught.value.body["message"]


def test_models_retrieve_without_id_400(live) -> None:
    response = httpx.get(f"{live.base_url}/v1/models/")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "missing_field"
    assert "model id is missing" in response.json()["error"]["message"]


def test_health_ready_metrics(live) -> None:
    assert httpx.get(f"{live.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live.base_url}/ready").status_code == 200
    _client(live).completions.create(model="alpha", prompt="I", max_tokens=3, temperature=0)
    _client(live).completions.create(model="beta", prompt="I", max_tokens=3, temperature=0)
    text = httpx.get(f"{live.base_url}/metrics").text
    for name in (
        "deltamux_requests_total", "deltamux_request_latency_seconds_bucket", "deltamux_queue_depth",
        "deltamux_time_to_first_token_seconds_bucket", "deltamux_tokens_generated_total", "deltamux_swaps_total",
    ):
        assert name in text, name
    for stage in ("disk_load", "copy_to_device", "apply", "restore"):
        assert f'deltamux_swap_stage_seconds_count{{stage="{stage}"}}' in text, stage
    assert 'deltamux_requests_total{endpoint="completions",status="200",task="alpha"}' in text


def test_concurrent_mixed_tasks_match_single_tenant(live, references, tokenizer, tiny_base) -> None:
    # 1. 57 requests over the base and two tasks, shuffled, some streaming, sent at once.
    rng = random.Random(5)
    jobs = [
        (model, PROMPTS[i % len(PROMPTS)], 6 + (i * 7) % 17, i % 3 == 0)
        for i in range(19)
        for model in (BASE_ID, "alpha", "beta")
    ]
    rng.shuffle(jobs)
    client = openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(model: str, prompt: str, max_tokens: int, stream: bool) -> str:
        if not stream:
            result = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
            return result.choices[0].text
        chunks = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def run_all() -> list[str]:
        try:
            return await asyncio.gather(*(one(*job) for job in jobs))
        finally:
            await client.close()

    swaps_before = live.runtime.engine.swap_count
    outputs = asyncio.run(run_all())

    # 2. Every output equals the plain model's for that task, and the tasks did interleave.
    for (model, prompt, max_tokens, _), output in zip(jobs, outputs, strict=True):
        assert output == _expected(references, tokenizer, model, prompt, max_tokens), (model, prompt, max_tokens)
    assert live.runtime.engine.swap_count - swaps_before >= 2

    # 3. Back on the base, the weights are bit-identical to a fresh load.
    _client(live).completions.create(model=BASE_ID, prompt="I", max_tokens=2, temperature=0)
    assert live.runtime.engine.current_task == BASE_ID
    fresh = reference_model(tiny_base, None)
    assert weights_hash(live.runtime.engine.params) == weights_hash(model_params(fresh))


def test_stream_disconnect_cancels_request(live) -> None:
    registry = live.runtime.metrics.registry
    finished = registry.get_sample_value("deltamux_request_latency_seconds_count", {"task": "beta"}) or 0.0
    body = {"model": "beta", "prompt": "I", "max_tokens": 120, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/completions", json=body, timeout=60) as response:
        first = next(line for line in response.iter_lines() if line)
    assert first.startswith("data: {")

    # The cancelled request leaves the batch without a result, so no latency is recorded for it.
    _client(live).completions.create(model="beta", prompt="I", max_tokens=2, temperature=0)
    after = registry.get_sample_value("deltamux_request_latency_seconds_count", {"task": "beta"})
    assert after == finished + 1
