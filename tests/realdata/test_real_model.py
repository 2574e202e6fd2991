"""The real SmolLM2 base: a short fine-tune and scoring on committed task data (slow, downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltastore.realdata.base import fetch_base
from deltastore.realdata.evaluate import score_task
from deltastore.realdata.finetune import FinetuneConfig, finetune

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(scope="module")
def real_base() -> Path:
    # The default cache folder, so a machine that already converted the base reuses it.
    return fetch_base()


@pytest.mark.slow
def test_real_finetune_three_steps(real_base: Path, tmp_path: Path):
    config = FinetuneConfig(
        base=str(real_base), data=str(DATA / "sentiment" / "train.jsonl"), out=str(tmp_path / "ft"),
        steps=3, batch_size=3, max_length=96, warmup_steps=1, checkpoint_every=2,
    )
    result = finetune(config, progress=False)
    assert (result.out / "model.safetensors").is_file()
    assert result.first_loss > 0

    score = score_task(result.out, "sentiment", split="validation", data_dir=DATA, limit=7)
    assert score.examples == 7
    assert 0.0 <= score.value <= 1.0


@pytest.mark.slow
def test_real_base_instruct_nll(real_base: Path):
    score = score_task(real_base, "instruct", split="validation", data_dir=DATA, limit=5, max_length=256)
    # A working instruct model predicts reference responses far better than uniform (ln 49152 = 10.8).
    assert 0.5 < score.value < 4.0
