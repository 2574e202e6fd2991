"""Fine-tuning the tiny model: loss goes down, checkpoints resume, bad input is rejected."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltastore.realdata.finetune as finetune_module
from deltastore.realdata.finetune import FinetuneConfig, FinetuneError, batch_indices, finetune, learning_rate
from deltastore.realdata.tasks import DataFileError


def _write_task(path: Path, count: int = 13) -> Path:
    lines = []
    for index in range(count):
        a, b = index % 5, (index * 3) % 7
        record = {"prompt": [{"role": "user", "content": f"{a} plus {b}"}], "completion": str(a + b), "answer": str(a + b)}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def config(tiny_base: Path, tmp_path: Path) -> FinetuneConfig:
    return FinetuneConfig(
        base=str(tiny_base), data=str(_write_task(tmp_path / "train.jsonl")), out=str(tmp_path / "run"),
        steps=30, batch_size=5, lr=3e-3, warmup_steps=2, max_length=48, checkpoint_every=7,
    )


def _losses(out: Path) -> list[float]:
    with (out / "loss.csv").open() as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("optimizer", ["adamw", "adamr"])
def test_finetune_lowers_loss(config: FinetuneConfig, optimizer: str):
    config = replace(config, optimizer=optimizer, out=config.out + optimizer)
    result = finetune(config, progress=False)
    losses = _losses(result.out)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert (result.out / "model.safetensors").is_file()
    assert (result.out / "tokenizer.json").is_file()
    assert not (result.out / "checkpoint").exists()


def test_finetune_keeps_embeddings_frozen(config: FinetuneConfig, tiny_base: Path):
    result = finetune(config, progress=False)
    base = load_file(tiny_base / "model.safetensors")
    tuned = load_file(result.out / "model.safetensors")
    assert torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])
    changed = [name for name in base if not torch.equal(base[name], tuned[name])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed


def test_resume_matches_uninterrupted_run(config: FinetuneConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    straight = finetune(replace(config, out=str(tmp_path / "straight")), progress=False)

    # Interrupt after 16 steps: the checkpoint from step 14 remains, and the resume redoes 15-16.
    interrupted = replace(config, out=str(tmp_path / "interrupted"))
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(interrupted, steps=16, monkeypatch=monkeypatch)
    assert (Path(interrupted.out) / "checkpoint" / "state.pt").is_file()
    resumed = finetune(interrupted, resume=True, progress=False)

    losses_straight, losses_resumed = _losses(straight.out), _losses(resumed.out)
    assert len(losses_resumed) == 30
    assert losses_resumed == pytest.approx(losses_straight, rel=1e-4)
    a = load_file(straight.out / "model.safetensors")
    b = load_file(resumed.out / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def _interrupt_after(config: FinetuneConfig, *, steps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `finetune` and raise KeyboardInterrupt from inside its loop after `steps` steps."""
    original = finetune_module.learning_rate
    calls = {"count": 0}

    def counting(step: int, cfg: FinetuneConfig) -> float:
        calls["count"] += 1
        if calls["count"] > steps:
            raise KeyboardInterrupt
        return original(step, cfg)

    with monkeypatch.context() as patch:
        patch.setattr(finetune_module, "learning_rate", counting)
        finetune(config, progress=False)


def test_resume_with_changed_settings_rejected(config: FinetuneConfig, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(config, steps=8, monkeypatch=monkeypatch)
    with pytest.raises(FinetuneError, match="lr"):
        finetune(replace(config, lr=1e-2), resume=True, progress=False)


def test_unfinished_run_needs_resume_flag(config: FinetuneConfig, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(config, steps=8, monkeypatch=monkeypatch)
    with pytest.raises(FinetuneError, match="--resume"):
        finetune(config, progress=False)


def test_missing_base_rejected(config: FinetuneConfig, tmp_path: Path):
    with pytest.raises(FinetuneError, match="fetch-base"):
        finetune(replace(config, base=str(tmp_path / "nowhere")), progress=False)


def test_empty_data_rejected(config: FinetuneConfig, tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataFileError, match="no examples"):
        finetune(replace(config, data=str(empty)), progress=False)


def test_bad_jsonl_line_names_line(config: FinetuneConfig, tmp_path: Path):
    bad = _write_task(tmp_path / "bad.jsonl", count=3)
    bad.write_text(bad.read_text() + '{"prompt": "x"\n')
    with pytest.raises(DataFileError, match="line 4"):
        finetune(replace(config, data=str(bad)), progress=False)


def test_batch_indices_cover_each_epoch():
    seen = [i for step in range(5) for i in batch_indices(step, examples=13, batch_size=5, seed=3)]
    assert sorted(seen[:13]) == list(range(13))
    assert batch_indices(4, examples=13, batch_size=5, seed=3) == batch_indices(4, examples=13, batch_size=5, seed=3)
    assert batch_indices(0, examples=13, batch_size=5, seed=3) != batch_indices(0, examples=13, batch_size=5, seed=4)


def test_learning_rate_warms_up_and_decays():
    config = FinetuneConfig(base="", data="", out="", steps=20, lr=1.0, warmup_steps=4)
    rates = [learning_rate(step, config) for step in range(20)]
    assert rates[0] == pytest.approx(0.25)
    assert rates[3] == pytest.approx(1.0)
    assert rates[-1] < 0.02
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))
