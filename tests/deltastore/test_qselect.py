"""The DAREx-q search: the grid walk on synthetic scores, and both selectors on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from deltastore.compress import CompressError, compress
from deltastore.format import SparseEntry, read_delta
from deltastore.qselect import QSearchSettings, search_q


def test_search_finds_peak_within_fine_step():
    q, score, trace = search_q(lambda q: -((q - 0.637) ** 2), drop_rate=0.9, maximize=True)
    fine_step = 0.9 / 20 / 10
    assert abs(q - 0.637) <= fine_step
    assert score == max(point.score for point in trace)


def test_search_minimizes():
    q, score, trace = search_q(lambda q: (q - 0.42) ** 2, drop_rate=0.8, maximize=False)
    assert abs(q - 0.42) <= 0.8 / 20 / 10
    assert score == min(point.score for point in trace)


def test_search_stops_after_patience():
    # Falling scores: q = 1 - p is best, so the coarse walk stops after 4 more candidates.
    settings = QSearchSettings(coarse_steps=20, patience=4, refine_factor=10)
    _, _, trace = search_q(lambda q: -q, drop_rate=0.5, maximize=True, settings=settings)
    coarse = [point.q for point in trace[:5]]
    assert coarse == pytest.approx([0.5, 0.525, 0.55, 0.575, 0.6])
    # The fine grid below the lowest q is out of range, so only the 9 points above remain.
    assert len(trace) == 5 + 9


def test_search_starts_at_dare_and_stays_in_range():
    _, _, trace = search_q(lambda q: q * (1 - q), drop_rate=0.99, maximize=True)
    assert trace[0].q == pytest.approx(0.01)
    assert all(0.01 - 1e-12 <= point.q <= 1.0 for point in trace)
    assert len({point.q for point in trace}) == len(trace)


def test_search_with_drop_rate_zero():
    q, score, trace = search_q(lambda q: 3.0, drop_rate=0.0, maximize=True)
    assert q == 1.0
    assert score == 3.0
    assert len(trace) == 1


def test_search_rejects_invalid_drop_rate():
    with pytest.raises(ValueError, match="drop rate"):
        search_q(lambda q: 0.0, drop_rate=1.0, maximize=True)


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calibration.jsonl"
    texts = ["The quick brown fox jumps over the lazy dog.", "Sparse deltas are applied in place and restored exactly."]
    path.write_text("\n".join(json.dumps({"text": text}) for text in texts) + "\n")
    return path


def test_output_change_selection_recorded(tmp_path, tiny_base, tiny_finetunes, calibration_file):
    metadata = compress(
        base=tiny_base,
        finetuned=tiny_finetunes["alpha"],
        task="alpha",
        store=tmp_path / "store",
        method="darex-q",
        drop_rate=0.9,
        seed=4,
        q_select="output-change",
        calibration=calibration_file,
        value_dtype="float32",
    )
    search = metadata.params["q_search"]
    assert search["selector"] == "output-change"
    assert search["mask_seeds"] == [4, 5]
    assert 0.1 - 1e-9 <= metadata.params["q"] <= 1.0
    assert search["q"] == metadata.params["q"]
    assert search["score"] == min(score for _, score in search["trace"])

    # The written entries are the compression seed's mask, rescaled by the chosen q.
    q = metadata.params["q"]
    reference = compress(
        base=tiny_base,
        finetuned=tiny_finetunes["alpha"],
        task="reference",
        store=tmp_path / "store",
        method="darex-q",
        drop_rate=0.9,
        seed=4,
        q=q,
        value_dtype="float32",
    )
    assert reference.nnz == metadata.nnz
    selected = read_delta(tmp_path / "store" / "alpha.delta.safetensors").entries
    expected = read_delta(tmp_path / "store" / "reference.delta.safetensors").entries
    for name, entry in selected.items():
        if isinstance(entry, SparseEntry):
            assert torch.equal(entry.indices, expected[name].indices), name
        assert torch.equal(entry.values, expected[name].values), name


def test_validation_selection_recorded(tmp_path, tiny_base, tiny_finetunes):
    validation = tmp_path / "validation.jsonl"
    samples = [
        {"prompt": "What is two plus two? The answer is", "completion": " four.", "answer": "four."},
        {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."},
    ]
    validation.write_text("\n".join(json.dumps(sample) for sample in samples) + "\n")
    metadata = compress(
        base=tiny_base,
        finetuned=tiny_finetunes["beta"],
        task="beta",
        store=tmp_path / "store",
        method="darex-q",
        drop_rate=0.5,
        q_select="validation",
        validation=validation,
    )
    search = metadata.params["q_search"]
    assert search["selector"] == "validation"
    assert search["metric"] == "exact-match accuracy"
    assert search["mask_seeds"] == [0]
    assert all(0.0 <= score <= 1.0 for _, score in search["trace"])
    assert search["score"] == max(score for _, score in search["trace"])


def test_validation_selection_needs_file(tmp_path, tiny_base, tiny_finetunes):
    with pytest.raises(CompressError, match="validation file"):
        compress(
            base=tiny_base,
            finetuned=tiny_finetunes["alpha"],
            task="alpha",
            store=tmp_path / "store",
            method="darex-q",
            drop_rate=0.9,
            q_select="validation",
        )


def test_q_and_selector_exclusive(tmp_path, tiny_base, tiny_finetunes, calibration_file):
    with pytest.raises(CompressError, match="not both"):
        compress(
            base=tiny_base,
            finetuned=tiny_finetunes["alpha"],
            task="alpha",
            store=tmp_path / "store",
            method="darex-q",
            drop_rate=0.9,
            q=0.5,
            q_select="output-change",
            calibration=calibration_file,
        )


def test_empty_calibration_rejected_before_work(tmp_path, tiny_base, tiny_finetunes):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        compress(
            base=tiny_base,
            finetuned=tiny_finetunes["alpha"],
            task="alpha",
            store=tmp_path / "store",
            method="darex-q",
            drop_rate=0.9,
            q_select="output-change",
            calibration=empty,
        )
    assert not (tmp_path / "store").exists()
