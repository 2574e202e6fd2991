"""The recommender: delta statistics, the selection pipeline, the short search, and method auto."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from deltastore import cli
from deltastore.compress import compress
from deltastore.format import read_metadata
from deltastore.recommend import LARGE_DELTA, recommend
from tests.tinymodel import save_finetune


@pytest.fixture(scope="module")
def small_finetune(tmp_path_factory, tiny_base) -> Path:
    """A fine-tune stand-in with deltas of standard deviation 0.001 (mean |delta| about 0.0008)."""
    return save_finetune(tiny_base, tmp_path_factory.mktemp("small") / "small", seed=7, scale=0.001)


@pytest.fixture
def calibration_file(tmp_path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\nWhat is two plus two? The answer is four.\n")
    return path


SEARCH = {"drop_rates": (0.5, 0.9), "window_tokens": 16, "max_windows": 2}


def test_statistics_separate_large_and_small(tiny_base, tiny_finetunes, small_finetune) -> None:
    large = recommend(base=tiny_base, finetuned=tiny_finetunes["alpha"]).stats
    small = recommend(base=tiny_base, finetuned=small_finetune).stats

    assert len(large.layers) == 14
    assert large.mean_abs > LARGE_DELTA
    assert small.mean_abs < LARGE_DELTA
    # Gaussian deltas of standard deviation s have mean |delta| s * sqrt(2 / pi).
    assert small.mean_abs == pytest.approx(0.001 * (2 / 3.14159265) ** 0.5, rel=0.1)
    assert all(layer.std_abs > 0 for layer in large.layers)


def test_no_data_large_picks_magnitude(tiny_base, tiny_finetunes) -> None:
    recommendation = recommend(base=tiny_base, finetuned=tiny_finetunes["alpha"])

    assert recommendation.method == "magnitude"
    assert recommendation.candidates == []
    assert "large-delta" in recommendation.reasons[0]


def test_no_data_small_picks_dare(tiny_base, small_finetune) -> None:
    recommendation = recommend(base=tiny_base, finetuned=small_finetune)

    assert recommendation.method == "dare"
    assert "small-delta" in recommendation.reasons[0]
    assert recommendation.expected_nbytes > 0


def test_search_large_picks_importance_method(tiny_base, tiny_finetunes, calibration_file) -> None:
    recommendation = recommend(base=tiny_base, finetuned=tiny_finetunes["alpha"], calibration=calibration_file,
                               max_loss=1000.0, **SEARCH)

    assert recommendation.method in ("magnitude", "wanda")
    assert {c.method for c in recommendation.candidates} == {"magnitude", "wanda"}
    assert len(recommendation.candidates) == 4
    assert recommendation.drop_rate == 0.9


def test_search_small_picks_dare_family(tiny_base, small_finetune, calibration_file) -> None:
    recommendation = recommend(base=tiny_base, finetuned=small_finetune, calibration=calibration_file, **SEARCH)

    assert recommendation.method in ("dare", "darex-q")
    assert {c.method for c in recommendation.candidates} == {"dare", "darex-q"}
    darex = [c for c in recommendation.candidates if c.method == "darex-q"]
    assert all(c.q_select == "output-change" and 1 - c.drop_rate - 1e-9 <= c.q <= 1 for c in darex)


def test_search_without_candidate_in_budget(tiny_base, tiny_finetunes, calibration_file) -> None:
    recommendation = recommend(base=tiny_base, finetuned=tiny_finetunes["alpha"], calibration=calibration_file,
                               max_loss=0.0, **SEARCH)

    best = min(c.loss for c in recommendation.candidates)
    assert best > 0
    assert any("no candidate stays within 0 points" in reason for reason in recommendation.reasons)
    assert recommendation.expected_quality.endswith(f"a loss of {best:.3g} points (percent of the base's logit MSE to the fine-tune)")


def test_compress_auto_records_recommendation(tmp_path, tiny_base, small_finetune) -> None:
    metadata = compress(base=tiny_base, finetuned=small_finetune, task="small", store=tmp_path, method="auto", drop_rate=0.7)

    assert metadata.method == "dare"
    assert metadata.params["drop_rate"] == 0.7
    assert metadata.extra["recommendation"]["method"] == "dare"
    assert read_metadata(tmp_path / "small.delta.safetensors").extra["recommendation"]["reasons"]


def test_compress_auto_rejects_q(tmp_path, tiny_base, small_finetune) -> None:
    with pytest.raises(ValueError, match="chooses q itself"):
        compress(base=tiny_base, finetuned=small_finetune, task="small", store=tmp_path, method="auto", q=0.5)


def test_compress_without_drop_rate_rejected(tmp_path, tiny_base, small_finetune) -> None:
    with pytest.raises(ValueError, match="needs a drop rate"):
        compress(base=tiny_base, finetuned=small_finetune, task="small", store=tmp_path, method="dare")


def test_cli_prints_runnable_command(tiny_base, tiny_finetunes, capsys) -> None:
    parser = argparse.ArgumentParser(prog="deltamux")
    cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["recommend", "--base", str(tiny_base), "--finetuned", str(tiny_finetunes["alpha"])])

    assert args.func(args) == 0

    output = capsys.readouterr().out
    command = next(line.split("command:", 1)[1].strip() for line in output.splitlines() if "command:" in line)
    words = shlex.split(command)
    assert words[:2] == ["deltamux", "compress"]
    parsed = parser.parse_args(words[1:])
    assert parsed.method == "magnitude"
    assert parsed.drop_rate == 0.5
    assert "expected size" in output
    assert "why:" in output


def test_search_on_validation_counts_accuracy_points(tmp_path, tiny_base, small_finetune) -> None:
    validation = tmp_path / "validation.jsonl"
    validation.write_text(
        '{"prompt": "What is two plus two?", "completion": " The answer is four."}\n'
        '{"prompt": "The quick brown", "completion": " fox jumps over the lazy dog."}\n'
    )

    recommendation = recommend(base=tiny_base, finetuned=small_finetune, validation=validation, drop_rates=(0.9,),
                               max_new_tokens=8)

    assert recommendation.metric == "exact-match accuracy"
    assert recommendation.method in ("dare", "darex-q")
    assert all(c.loss in (-100.0, -50.0, 0.0, 50.0, 100.0) for c in recommendation.candidates)
    darex = next(c for c in recommendation.candidates if c.method == "darex-q")
    assert darex.q_select == "validation"
