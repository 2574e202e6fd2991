"""Mixed-task batches: per-row delta hooks match merged weights, and the engine mixes tasks safely."""

from __future__ import annotations

import copy
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import AutoModelForCausalLM

from deltastore.apply import DecodedDelta, DecodedTensor, decode
from deltastore.checkpoint import fingerprint
from deltastore.format import DenseEntry, read_delta, write_delta
from server.app import load_runtime
from server.engine import DoneEvent, EngineRequest, ErrorEvent, Event
from server.generation import SamplingParams
from server.metrics import Metrics
from server.mixing import MixedBatch, NotMixable, prepare
from server.settings import Settings
from tests.server.support import greedy_text, reference_model, start_server, tokenizer_for

PROMPTS = [[5, 9, 13, 2, 7], [11, 3, 8, 21, 4], [6, 6, 30, 12, 9]]


def _tiny_model(base: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def _decoded(path: Path) -> DecodedDelta:
    return decode(read_delta(path))


@torch.no_grad()
def test_mixed_rows_match_merged_models(tiny_base, delta_files) -> None:
    model = _tiny_model(tiny_base)
    alpha = prepare(model, _decoded(delta_files["alpha"]))
    beta = prepare(model, _decoded(delta_files["beta"]))
    ids = torch.tensor(PROMPTS)

    with MixedBatch(model, [alpha, None, beta]):
        mixed = model(input_ids=ids).logits

    expected = {
        0: reference_model(tiny_base, delta_files["alpha"])(input_ids=ids[0:1]).logits[0],
        1: reference_model(tiny_base, None)(input_ids=ids[1:2]).logits[0],
        2: reference_model(tiny_base, delta_files["beta"])(input_ids=ids[2:3]).logits[0],
    }
    for row, logits in expected.items():
        torch.testing.assert_close(mixed[row], logits, atol=1e-5, rtol=1e-5)
    # The deltas matter: a base row would be far from the alpha row's logits.
    base_row0 = reference_model(tiny_base, None)(input_ids=ids[0:1]).logits[0]
    assert (base_row0 - expected[0]).abs().max() > 1e-3


@torch.no_grad()
def test_set_active_routes_remaining_rows(tiny_base, delta_files) -> None:
    model = _tiny_model(tiny_base)
    alpha = prepare(model, _decoded(delta_files["alpha"]))
    beta = prepare(model, _decoded(delta_files["beta"]))
    with MixedBatch(model, [alpha, None, beta]) as mixing:
        mixing.set_active([2, 0])  # rows 0 and 1 of the next pass are sequences 2 (beta) and 0 (alpha)
        mixed = model(input_ids=torch.tensor([PROMPTS[2], PROMPTS[0]])).logits
    beta_logits = reference_model(tiny_base, delta_files["beta"])(input_ids=torch.tensor([PROMPTS[2]])).logits[0]
    alpha_logits = reference_model(tiny_base, delta_files["alpha"])(input_ids=torch.tensor([PROMPTS[0]])).logits[0]
    torch.testing.assert_close(mixed[0], beta_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], alpha_logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hooks_removed_after_batch(tiny_base, delta_files) -> None:
    model = _tiny_model(tiny_base)
    ids = torch.tensor(PROMPTS)
    before = model(input_ids=ids).logits
    with MixedBatch(model, [prepare(model, _decoded(delta_files["alpha"]))] * 3):
        model(input_ids=ids)
    after = model(input_ids=ids).logits
    assert torch.equal(before, after)


class TinyRMSNorm(nn.Module):
    """An RMSNorm shaped like the Llama one (weight, variance_epsilon)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden.to(x.dtype)


def _layered_model() -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(7, 5),  # 0: flat sparse weight delta and a bias delta
        nn.Linear(5, 6, bias=False),  # 1: kept rows
        nn.Linear(6, 5, bias=False),  # 2: kept columns
        nn.LayerNorm(5),  # 3: norm weight delta
        nn.Linear(5, 9, bias=False),  # 4: dense weight delta
        TinyRMSNorm(9),  # 5: norm weight delta
    )
    for parameter in model.parameters():
        nn.init.normal_(parameter, 0.0, 0.5)
    return model.eval()


def _layered_delta() -> DecodedDelta:
    generator = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.3

    tensors = [
        DecodedTensor(name="0.weight", indices=torch.tensor([33, 2, 17, 34, 8]), values=randn(5)),
        DecodedTensor(name="0.bias", indices=None, values=randn(5)),
        DecodedTensor(name="1.weight", indices=torch.tensor([4, 1]), values=randn(2, 5), axis=0),
        DecodedTensor(name="2.weight", indices=torch.tensor([0, 3, 5]), values=randn(5, 3), axis=1),
        DecodedTensor(name="3.weight", indices=torch.tensor([1, 4]), values=randn(2)),
        DecodedTensor(name="4.weight", indices=None, values=randn(9, 5)),
        DecodedTensor(name="5.weight", indices=None, values=randn(9)),
    ]
    return DecodedDelta(task="layered", tensors=tensors, device=torch.device("cpu"))


def _merged(model: nn.Module, decoded: DecodedDelta) -> nn.Module:
    merged = copy.deepcopy(model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for tensor in decoded.tensors:
            weight = params[tensor.name]
            if tensor.indices is None:
                weight += tensor.values
            elif tensor.axis is None:
                weight.view(-1)[tensor.indices] += tensor.values
            else:
                weight.index_add_(tensor.axis, tensor.indices, tensor.values)
    return merged


@torch.no_grad()
def test_every_term_kind_matches_merged_weights() -> None:
    model = _layered_model()
    decoded = _layered_delta()
    prepared = prepare(model, decoded)
    x = torch.randn(4, 3, 7, generator=torch.Generator().manual_seed(1))

    with MixedBatch(model, [prepared, None, prepared, None]):
        mixed = model(x)

    merged = _merged(model, decoded)(x)
    plain = model(x)
    torch.testing.assert_close(mixed[[0, 2]], merged[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[[1, 3]], plain[[1, 3]], atol=0, rtol=0)
    assert (merged - plain).abs().max() > 1e-2


def _scaled(decoded: DecodedDelta, factor: float, task: str) -> DecodedDelta:
    tensors = [
        DecodedTensor(name=t.name, indices=t.indices, values=t.values * factor, axis=t.axis) for t in decoded.tensors
    ]
    return DecodedDelta(task=task, tensors=tensors, device=decoded.device)


@torch.no_grad()
def test_stacked_tasks_match_merged_weights() -> None:
    # Two tasks in one batch: sparse, bias and norm deltas of both run as stacked products.
    model = _layered_model()
    first = _layered_delta()
    second = _scaled(first, -1.7, "second")
    rows = [prepare(model, first), prepare(model, second), None, prepare(model, first), None]
    x = torch.randn(5, 4, 7, generator=torch.Generator().manual_seed(2))

    with MixedBatch(model, rows):
        mixed = model(x)

    expected = {0: _merged(model, first), 1: _merged(model, second), 3: _merged(model, first)}
    for row, merged in expected.items():
        torch.testing.assert_close(mixed[row], merged(x[row : row + 1])[0], atol=1e-5, rtol=1e-5)
    for row in (2, 4):
        torch.testing.assert_close(mixed[row], model(x[row : row + 1])[0], atol=0, rtol=0)


def test_embedding_delta_not_mixable(tiny_base) -> None:
    model = _tiny_model(tiny_base)
    embedding = model.get_submodule("model.embed_tokens").weight
    decoded = DecodedDelta(
        task="embed",
        tensors=[DecodedTensor(name="model.embed_tokens.weight", indices=None, values=torch.zeros_like(embedding))],
        device=torch.device("cpu"),
    )
    with pytest.raises(NotMixable, match="model.embed_tokens.weight"):
        prepare(model, decoded)


def test_layernorm_bias_not_mixable() -> None:
    model = _layered_model()
    decoded = DecodedDelta(
        task="norm-bias", tensors=[DecodedTensor(name="3.bias", indices=None, values=torch.ones(5))],
        device=torch.device("cpu"),
    )
    with pytest.raises(NotMixable, match="LayerNorm"):
        prepare(model, decoded)


def test_mixed_with_full_swap_mode_rejected(tiny_base, tmp_path) -> None:
    with pytest.raises(ValidationError, match="mixed"):
        Settings(base=tiny_base, store=tmp_path, batching="mixed", swap_mode="full")


# -- the engine ----------------------------------------------------------------------------------


class Collector:
    """Collects the final events of engine requests."""

    def __init__(self, expected: int) -> None:
        self.events: dict[tuple[str, int], Event] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.expected = expected

    def request(self, task: str, index: int, prompt: list[int], *, max_tokens: int = 8) -> EngineRequest:
        def emit(event: Event) -> None:
            if isinstance(event, (DoneEvent, ErrorEvent)):
                with self.lock:
                    self.events[(task, index)] = event
                    if len(self.events) == self.expected:
                        self.done.set()

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return EngineRequest(task=task, prompt_ids=prompt, params=params, emit=emit, index=index)


def _greedy_ids(model: nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def _mixed_runtime(tiny_base: Path, store: Path, **overrides):
    settings = Settings(
        base=tiny_base, store=store, device="cpu", base_name="base", batching="mixed", max_batch_size=6,
        max_batch_wait=0.0, **overrides,
    )
    return load_runtime(settings, Metrics())


def _run_queued(runtime, collector: Collector) -> None:
    """Start the engine on its queued requests, wait until all finished, then stop it."""
    runtime.engine.start()
    try:
        assert collector.done.wait(120)
    finally:
        runtime.engine.stop()


def test_engine_mixes_tasks_in_one_batch(tiny_base, delta_files, tmp_path) -> None:
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], tmp_path)
    runtime = _mixed_runtime(tiny_base, tmp_path)
    tasks = ["alpha", "base", "beta", "alpha", "beta", "base"]
    collector = Collector(len(tasks))
    requests = [collector.request(task, i, PROMPTS[i % 3]) for i, task in enumerate(tasks)]
    runtime.engine.submit(requests)  # queued before the loop starts, so they share one batch
    _run_queued(runtime, collector)

    assert runtime.engine.mixed_batch_count == 1
    assert runtime.metrics.registry.get_sample_value("deltamux_mixed_batches_total") == 1
    assert runtime.engine.swap_count == 0  # a mixed batch runs on the base weights
    references = {
        "base": reference_model(tiny_base, None),
        "alpha": reference_model(tiny_base, delta_files["alpha"]),
        "beta": reference_model(tiny_base, delta_files["beta"]),
    }
    for i, task in enumerate(tasks):
        event = collector.events[(task, i)]
        assert isinstance(event, DoneEvent), event
        assert event.completion.token_ids == _greedy_ids(references[task], PROMPTS[i % 3], 8), (task, i)


def test_engine_serves_one_task_on_merged_weights(tiny_base, delta_files, tmp_path) -> None:
    shutil.copy(delta_files["alpha"], tmp_path)
    runtime = _mixed_runtime(tiny_base, tmp_path)
    collector = Collector(3)
    runtime.engine.submit([collector.request("alpha", i, PROMPTS[i]) for i in range(3)])
    _run_queued(runtime, collector)
    assert runtime.engine.mixed_batch_count == 0
    assert runtime.engine.swap_count == 1


def _embedding_delta(tiny_base: Path, out: Path) -> Path:
    """A delta that changes the (tied) embedding, which per-row hooks cannot add."""
    model = _tiny_model(tiny_base)
    shape = tuple(model.get_submodule("model.embed_tokens").weight.shape)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.05
    path = out / "embed.delta.safetensors"
    write_delta(
        path, task="embed", base_fingerprint=fingerprint(tiny_base), method="dare", params={"drop_rate": 0.0},
        entries={"model.embed_tokens.weight": DenseEntry(shape=shape, values=values)},
    )
    return path


def test_unmixable_task_served_alone(tiny_base, delta_files, tmp_path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(delta_files["alpha"], store)
    embed_path = _embedding_delta(tiny_base, tmp_path)
    shutil.copy(embed_path, store)
    runtime = _mixed_runtime(tiny_base, store)
    tasks = ["embed", "alpha", "embed", "alpha"]
    collector = Collector(len(tasks))
    runtime.engine.submit([collector.request(task, i, PROMPTS[i % 3]) for i, task in enumerate(tasks)])
    _run_queued(runtime, collector)

    assert runtime.engine.mixed_batch_count == 0  # embed cannot mix; alpha alone runs merged
    runtime.engine.drop_task("embed")
    assert runtime.engine._mixable("embed")  # a task registered again is checked afresh
    references = {"embed": reference_model(tiny_base, embed_path), "alpha": reference_model(tiny_base, delta_files["alpha"])}
    for i, task in enumerate(tasks):
        event = collector.events[(task, i)]
        assert isinstance(event, DoneEvent), event
        assert event.completion.token_ids == _greedy_ids(references[task], PROMPTS[i % 3], 8), (task, i)


def test_mixed_server_streams_each_task(tiny_base, delta_files, tmp_path) -> None:
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], tmp_path)
    settings = Settings(
        base=tiny_base, store=tmp_path, device="cpu", base_name="base", batching="mixed", max_batch_size=6,
        max_batch_wait=0.5,
    )
    server = start_server(settings)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    models = ["alpha", "beta", "base", "alpha", "beta", "base"]

    def stream(model: str) -> str:
        chunks = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=10, temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)

    try:
        with ThreadPoolExecutor(len(models)) as pool:
            texts = list(pool.map(stream, models))
        mixed_batches = server.runtime.engine.mixed_batch_count
    finally:
        server.stop()

    tokenizer = tokenizer_for(tiny_base)
    prompt = tokenizer("The quick brown fox").input_ids
    references = {"base": None, "alpha": delta_files["alpha"], "beta": delta_files["beta"]}
    for model, text in zip(models, texts, strict=True):
        expected, _ = greedy_text(reference_model(tiny_base, references[model]), tokenizer, prompt, max_tokens=10)
        assert text == expected, model
    assert mixed_batches >= 1


def test_deleted_task_fails_in_mixed_batch(tiny_base, delta_files, tmp_path) -> None:
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], tmp_path)
    runtime = _mixed_runtime(tiny_base, tmp_path)
    tasks = ["alpha", "beta", "base", "beta"]
    collector = Collector(len(tasks))
    runtime.engine.submit([collector.request(task, i, PROMPTS[i % 3]) for i, task in enumerate(tasks)])
    runtime.store.delete("beta")  # gone after queuing, before the batch runs
    _run_queued(runtime, collector)

    for i, task in enumerate(tasks):
        event = collector.events[(task, i)]
        if task == "beta":
            assert isinstance(event, ErrorEvent), event
            assert event.kind.value == "not_found"
        else:
            assert isinstance(event, DoneEvent), event


def test_deleted_single_task_fails_not_hangs(tiny_base, delta_files, tmp_path) -> None:
    shutil.copy(delta_files["alpha"], tmp_path)
    runtime = _mixed_runtime(tiny_base, tmp_path)
    collector = Collector(2)
    runtime.engine.submit([collector.request("alpha", i, PROMPTS[i]) for i in range(2)])
    runtime.store.delete("alpha")
    _run_queued(runtime, collector)
    assert all(isinstance(event, ErrorEvent) for event in collector.events.values())
