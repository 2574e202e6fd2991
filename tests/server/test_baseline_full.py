"""The `full` swap mode: whole fine-tuned tensors copied in, the base copied back, same outputs as `exact`."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest

from server.settings import Settings
from tests.server.conftest import BASE_ID
from tests.server.support import LiveServer, start_server, weights_hash

PROMPTS = ("What is two plus two?", "I love this phone", "Translate: good morning")


def _serve(tiny_base: Path, delta_files: dict[str, Path], store: Path, *, swap_mode: str) -> LiveServer:
    store.mkdir()
    for task in ("alpha", "beta"):
        shutil.copy(delta_files[task], store / delta_files[task].name)
    settings = Settings(
        base=tiny_base, store=store, device="cpu", base_name=BASE_ID, swap_mode=swap_mode, max_batch_size=3,
        time_slice=0.05, max_tokens_default=16,
    )
    return start_server(settings)


def _greedy_outputs(live: LiveServer) -> list[str]:
    """Alternate base and tasks so every request swaps; return the greedy texts in order."""
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)
    texts = []
    for _ in range(2):
        for model in ("alpha", BASE_ID, "beta", "alpha"):
            for prompt in PROMPTS:
                result = client.completions.create(model=model, prompt=prompt, max_tokens=11, temperature=0)
                texts.append(result.choices[0].text)
    return texts


@pytest.fixture(scope="module")
def exact_and_full(tiny_base, delta_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("baseline")
    servers = {mode: _serve(tiny_base, delta_files, folder / mode, swap_mode=mode) for mode in ("exact", "full")}
    yield servers
    for server in servers.values():
        server.stop()


def test_full_serves_exact_outputs(exact_and_full) -> None:
    exact = _greedy_outputs(exact_and_full["exact"])
    full = _greedy_outputs(exact_and_full["full"])

    assert full == exact
    # The tasks must differ from the base, or the comparison would prove nothing.
    assert exact[:3] != exact[3:6]


def test_full_restores_base_bits(exact_and_full) -> None:
    live = exact_and_full["full"]
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)
    client.completions.create(model=BASE_ID, prompt="I", max_tokens=2, temperature=0)
    before = weights_hash(live.runtime.engine.params)

    client.completions.create(model="beta", prompt="I", max_tokens=2, temperature=0)
    assert live.runtime.engine.current_task == "beta"
    assert weights_hash(live.runtime.engine.params) != before
    client.completions.create(model=BASE_ID, prompt="I", max_tokens=2, temperature=0)

    assert live.runtime.engine.current_task == BASE_ID
    assert weights_hash(live.runtime.engine.params) == before
    # The exact server, restored by its own path, has the same base bits.
    exact = exact_and_full["exact"]
    openai.OpenAI(base_url=f"{exact.base_url}/v1", api_key="unused", max_retries=0).completions.create(
        model=BASE_ID, prompt="I", max_tokens=2, temperature=0
    )
    assert weights_hash(exact.runtime.engine.params) == before


def test_full_counts_swaps_and_cache(exact_and_full) -> None:
    live = exact_and_full["full"]
    registry = live.runtime.metrics.registry
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)
    swaps_before = live.runtime.engine.swap_count

    for model in ("alpha", "beta", "alpha"):
        client.completions.create(model=model, prompt="I", max_tokens=2, temperature=0)

    assert live.runtime.engine.swap_count >= swaps_before + 2
    assert registry.get_sample_value("deltamux_delta_loads_total", {"tier": "full"}) == 2.0
    assert registry.get_sample_value("deltamux_delta_cache_bytes", {"tier": "full"}) > 0
