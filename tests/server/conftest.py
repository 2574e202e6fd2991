"""Server fixtures: delta files of the tiny fine-tunes, reference models, one live server per session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from server.settings import Settings
from tests.server.support import LiveServer, make_delta, reference_model, start_server, tokenizer_for

BASE_ID = "tiny-base"
FOREIGN_FINGERPRINT = "sha256:" + "0" * 64


@pytest.fixture(scope="session")
def delta_files(tiny_base: Path, tiny_finetunes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """alpha and beta (served from the start), gamma (uploaded by tests), foreign (for another base)."""
    out = tmp_path_factory.mktemp("deltas")
    return {
        "alpha": make_delta(tiny_base, tiny_finetunes["alpha"], out, task="alpha", seed=11),
        "beta": make_delta(tiny_base, tiny_finetunes["beta"], out, task="beta", seed=12),
        "gamma": make_delta(tiny_base, tiny_finetunes["beta"], out, task="gamma", keep=0.3, seed=13),
        "foreign": make_delta(
            tiny_base, tiny_finetunes["alpha"], out, task="foreign", seed=14, base_fingerprint=FOREIGN_FINGERPRINT
        ),
    }


@pytest.fixture(scope="session")
def references(tiny_base: Path, delta_files: dict[str, Path]) -> dict[str, PreTrainedModel]:
    """Plain transformers models with each task's reconstructed weights, keyed by model id."""
    models = {BASE_ID: reference_model(tiny_base, None)}
    for task in ("alpha", "beta", "gamma"):
        models[task] = reference_model(tiny_base, delta_files[task])
    return models


@pytest.fixture(scope="session")
def tokenizer(tiny_base: Path):
    return tokenizer_for(tiny_base)


@pytest.fixture(scope="session")
def live(tiny_base: Path, delta_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The server on the tiny base with alpha, beta and a foreign-base delta in its store."""
    store = tmp_path_factory.mktemp("store")
    for task in ("alpha", "beta", "foreign"):
        shutil.copy(delta_files[task], store / delta_files[task].name)
    settings = Settings(
        base=tiny_base, store=store, device="cpu", dtype="auto", base_name=BASE_ID, max_batch_size=5,
        time_slice=0.05, max_tokens_default=24,
    )
    server = start_server(settings)
    yield server
    server.stop()
