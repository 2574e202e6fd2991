"""Shared fixtures: tiny checkpoints built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tinymodel import save_finetune, save_tiny_base


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama base folder (tied embeddings) with a real BPE tokenizer."""
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_finetunes(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    """Two fine-tune stand-ins of `tiny_base`, keyed by task name."""
    root = tmp_path_factory.mktemp("tiny-finetunes")
    return {
        "alpha": save_finetune(tiny_base, root / "alpha", seed=1),
        "beta": save_finetune(tiny_base, root / "beta", seed=2),
    }
