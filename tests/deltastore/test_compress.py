"""The compression pipeline on tiny Llama checkpoints written by the tests."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltastore.checkpoint import FINGERPRINT_FILE, Checkpoint, CheckpointError
from deltastore.compress import CompressError, compress
from deltastore.format import DenseEntry, SparseEntry, read_delta
from deltastore.methods import PruneOptions, PruningParameterError, keep_count, prune

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


def copy_checkpoint(source: Path, target: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Copy a checkpoint folder and rewrite its weights through `change`."""
    shutil.copytree(source, target)
    (target / FINGERPRINT_FILE).unlink(missing_ok=True)
    tensors = load_file(target / "model.safetensors")
    change(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def float32_delta(base: Path, finetuned: Path, name: str) -> torch.Tensor:
    return Checkpoint.open(finetuned).get(name).float() - Checkpoint.open(base).get(name).float()


def run(tmp_path: Path, base: Path, finetuned: Path, **kwargs):
    options = {"task": "alpha", "method": "dare", "drop_rate": 0.5, "value_dtype": "float32", **kwargs}
    return compress(base=base, finetuned=finetuned, store=tmp_path / "store", **options)


def test_round_trip_matches_method(tmp_path, tiny_base, tiny_finetunes):
    metadata = run(tmp_path, tiny_base, tiny_finetunes["alpha"], drop_rate=0.7, seed=3)
    delta = read_delta(tmp_path / "store" / "alpha.delta.safetensors")
    assert delta.metadata == metadata

    expected = prune(
        float32_delta(tiny_base, tiny_finetunes["alpha"], Q_PROJ),
        method="dare",
        name=Q_PROJ,
        options=PruneOptions(drop_rate=0.7, seed=3),
    )
    entry = delta.entries[Q_PROJ]
    assert isinstance(entry, SparseEntry)
    assert torch.equal(entry.indices, expected.indices)
    assert torch.equal(entry.values, expected.values)


def test_metadata_records_parameters(tmp_path, tiny_base, tiny_finetunes):
    metadata = run(tmp_path, tiny_base, tiny_finetunes["alpha"], method="darex-q", drop_rate=0.9, q=0.3, seed=5)
    assert metadata.method == "darex-q"
    assert metadata.task == "alpha"
    assert metadata.params["drop_rate"] == 0.9
    assert metadata.params["q"] == 0.3
    assert metadata.params["seed"] == 5
    assert metadata.params["q_select"] is None
    assert metadata.extra["base_numel"] == Checkpoint.open(tiny_base).numel()


def test_unchanged_tensors_skipped(tmp_path, tiny_base, tiny_finetunes):
    metadata = run(tmp_path, tiny_base, tiny_finetunes["alpha"])
    assert EMBED not in metadata.tensors
    assert "lm_head.weight" not in metadata.tensors
    assert "model.layers.0.input_layernorm.weight" not in metadata.tensors


def test_other_tensors_exact_or_dropped(tmp_path, tiny_base, tiny_finetunes):
    exact = run(tmp_path / "exact", tiny_base, tiny_finetunes["alpha"])
    assert exact.tensors[NORM].kind == "dense"
    delta = read_delta(tmp_path / "exact" / "store" / "alpha.delta.safetensors")
    assert isinstance(delta.entries[NORM], DenseEntry)
    assert torch.equal(delta.entries[NORM].values, float32_delta(tiny_base, tiny_finetunes["alpha"], NORM))

    dropped = run(tmp_path / "drop", tiny_base, tiny_finetunes["alpha"], other_tensors="drop")
    assert NORM not in dropped.tensors
    assert all(info.kind == "sparse" for info in dropped.tensors.values())


def test_pruned_tensors_are_linear_weights(tmp_path, tiny_base, tiny_finetunes):
    metadata = run(tmp_path, tiny_base, tiny_finetunes["alpha"])
    sparse = sorted(name for name, info in metadata.tensors.items() if info.kind == "sparse")
    assert len(sparse) == 2 * 7
    assert all(name.endswith("_proj.weight") for name in sparse)


def test_exclude_keeps_tensors_exact(tmp_path, tiny_base, tiny_finetunes):
    metadata = run(tmp_path, tiny_base, tiny_finetunes["alpha"], exclude=["*.mlp.*"])
    mlp = [name for name in metadata.tensors if ".mlp." in name]
    assert len(mlp) == 6
    assert all(metadata.tensors[name].kind == "dense" for name in mlp)
    assert metadata.tensors[Q_PROJ].kind == "sparse"


def test_include_limits_pruned_tensors(tmp_path, tiny_base, tiny_finetunes):
    metadata = run(tmp_path, tiny_base, tiny_finetunes["alpha"], include=["*.q_proj.weight"], other_tensors="drop")
    assert sorted(metadata.tensors) == [Q_PROJ, "model.layers.1.self_attn.q_proj.weight"]


def test_magnitude_file_has_exact_counts(tmp_path, tiny_base, tiny_finetunes):
    metadata = run(tmp_path, tiny_base, tiny_finetunes["alpha"], method="magnitude", drop_rate=0.93)
    for name, info in metadata.tensors.items():
        if info.kind == "sparse":
            assert info.nnz == keep_count(math.prod(info.shape), 0.93), name


def test_darex_q_file_equals_dare_file(tmp_path, tiny_base, tiny_finetunes):
    run(tmp_path / "dare", tiny_base, tiny_finetunes["beta"], drop_rate=0.8, seed=2)
    run(tmp_path / "darex", tiny_base, tiny_finetunes["beta"], method="darex-q", drop_rate=0.8, q=1 - 0.8, seed=2)
    dare = read_delta(tmp_path / "dare" / "store" / "alpha.delta.safetensors").entries
    darex = read_delta(tmp_path / "darex" / "store" / "alpha.delta.safetensors").entries
    assert sorted(dare) == sorted(darex)
    for name, entry in dare.items():
        if isinstance(entry, SparseEntry):
            assert torch.equal(entry.indices, darex[name].indices)
        assert torch.equal(entry.values, darex[name].values)


def test_drop_rate_zero_reproduces_finetune(tmp_path, tiny_base, tiny_finetunes):
    run(tmp_path, tiny_base, tiny_finetunes["alpha"], drop_rate=0.0)
    entry = read_delta(tmp_path / "store" / "alpha.delta.safetensors").entries[Q_PROJ]
    dense = torch.zeros(entry.shape).reshape(-1)
    dense[entry.indices] = entry.values
    assert torch.equal(dense.reshape(entry.shape), float32_delta(tiny_base, tiny_finetunes["alpha"], Q_PROJ))


def test_wanda_keeps_count_per_row(tmp_path, tiny_base, tiny_finetunes):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog.\nWhat is two plus two? The answer is four.\n")
    run(tmp_path, tiny_base, tiny_finetunes["alpha"], method="wanda", drop_rate=0.75, calibration=calibration)
    entry = read_delta(tmp_path / "store" / "alpha.delta.safetensors").entries[Q_PROJ]
    rows, columns = entry.shape
    per_row = torch.bincount(entry.indices // columns, minlength=rows)
    assert torch.all(per_row == keep_count(columns, 0.75))


def test_tied_output_embedding_stored_once(tmp_path, tiny_base, tiny_finetunes):
    def store_lm_head(tensors):
        tensors[EMBED] = tensors[EMBED] + 0.01
        tensors["lm_head.weight"] = tensors[EMBED].clone()

    finetuned = copy_checkpoint(tiny_finetunes["alpha"], tmp_path / "tied", store_lm_head)
    metadata = run(tmp_path, tiny_base, finetuned)
    assert metadata.tensors[EMBED].kind == "dense"
    assert "lm_head.weight" not in metadata.tensors


def test_different_shapes_rejected(tmp_path, tiny_base, tiny_finetunes):
    def shrink(tensors):
        tensors[Q_PROJ] = tensors[Q_PROJ][:-1].contiguous()

    finetuned = copy_checkpoint(tiny_finetunes["alpha"], tmp_path / "shrunk", shrink)
    with pytest.raises(CompressError) as error:
        run(tmp_path, tiny_base, finetuned)
    message = str(error.value)
    assert Q_PROJ in message
    assert "(48, 48)" in message
    assert "(47, 48)" in message
    assert not (tmp_path / "store").exists()


def test_different_tensor_names_rejected(tmp_path, tiny_base, tiny_finetunes):
    def remove(tensors):
        del tensors[NORM]

    finetuned = copy_checkpoint(tiny_finetunes["alpha"], tmp_path / "missing", remove)
    with pytest.raises(CompressError, match="only in base: \\['model.norm.weight'\\]"):
        run(tmp_path, tiny_base, finetuned)


def test_other_architecture_rejected(tmp_path, tiny_base, tiny_finetunes):
    finetuned = tmp_path / "mistral"
    shutil.copytree(tiny_finetunes["alpha"], finetuned)
    config = json.loads((finetuned / "config.json").read_text())
    config["model_type"] = "mistral"
    (finetuned / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match="'llama' model but fine-tune .* is a 'mistral' model"):
        run(tmp_path, tiny_base, finetuned)


def test_untied_finetune_of_tied_base_rejected(tmp_path, tiny_base, tiny_finetunes):
    finetuned = tmp_path / "untied"
    shutil.copytree(tiny_finetunes["alpha"], finetuned)
    config = json.loads((finetuned / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (finetuned / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match="tie_word_embeddings"):
        run(tmp_path, tiny_base, finetuned)


def test_rescale_with_dare_rejected(tmp_path, tiny_base, tiny_finetunes):
    with pytest.raises(CompressError, match="magnitude and wanda only"):
        run(tmp_path, tiny_base, tiny_finetunes["alpha"], rescale=True)


def test_nan_in_finetune_rejected(tmp_path, tiny_base, tiny_finetunes):
    def poison(tensors):
        tensors[Q_PROJ][3, 5] = float("nan")

    finetuned = copy_checkpoint(tiny_finetunes["alpha"], tmp_path / "nan", poison)
    with pytest.raises(CompressError, match="q_proj.weight.*NaN"):
        run(tmp_path, tiny_base, finetuned)
    assert not (tmp_path / "store").exists()


def test_inf_in_other_tensor_rejected(tmp_path, tiny_base, tiny_finetunes):
    def poison(tensors):
        tensors[NORM][0] = float("inf")

    finetuned = copy_checkpoint(tiny_finetunes["alpha"], tmp_path / "inf", poison)
    with pytest.raises(CompressError, match="model.norm.weight"):
        run(tmp_path, tiny_base, finetuned)


def test_missing_folder_rejected(tmp_path, tiny_base):
    with pytest.raises(CheckpointError, match="does not exist"):
        run(tmp_path, tiny_base, tmp_path / "nowhere")


def test_pickle_checkpoint_rejected(tmp_path, tiny_base):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="Convert"):
        run(tmp_path, tiny_base, folder)


@pytest.mark.parametrize("drop_rate", [-0.5, 1.0, 2.0])
def test_drop_rate_out_of_range_rejected(tmp_path, tiny_base, tiny_finetunes, drop_rate):
    with pytest.raises(PruningParameterError, match=r"\[0, 1\)"):
        run(tmp_path, tiny_base, tiny_finetunes["alpha"], drop_rate=drop_rate)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("q", [0.05, 1.5])
def test_q_out_of_range_rejected(tmp_path, tiny_base, tiny_finetunes, q):
    with pytest.raises(PruningParameterError, match=r"\[0.1, 1\]"):
        run(tmp_path, tiny_base, tiny_finetunes["alpha"], method="darex-q", drop_rate=0.9, q=q)


def test_darex_q_needs_q_or_selector(tmp_path, tiny_base, tiny_finetunes):
    with pytest.raises(CompressError, match="needs q"):
        run(tmp_path, tiny_base, tiny_finetunes["alpha"], method="darex-q")


def test_q_with_dare_rejected(tmp_path, tiny_base, tiny_finetunes):
    with pytest.raises(CompressError, match="darex-q only"):
        run(tmp_path, tiny_base, tiny_finetunes["alpha"], q=0.7)


def test_wanda_needs_calibration(tmp_path, tiny_base, tiny_finetunes):
    with pytest.raises(CompressError, match="calibration"):
        run(tmp_path, tiny_base, tiny_finetunes["alpha"], method="wanda")


def test_invalid_task_name_rejected(tmp_path, tiny_base, tiny_finetunes):
    with pytest.raises(ValueError, match="invalid task name"):
        run(tmp_path, tiny_base, tiny_finetunes["alpha"], task="../escape")


def test_rewrite_replaces_file(tmp_path, tiny_base, tiny_finetunes):
    first = run(tmp_path, tiny_base, tiny_finetunes["alpha"], drop_rate=0.5)
    second = run(tmp_path, tiny_base, tiny_finetunes["alpha"], drop_rate=0.9)
    assert second.nnz < first.nnz
    assert sorted(path.name for path in (tmp_path / "store").iterdir()) == ["alpha.delta.safetensors"]


def test_invalid_window_budget_rejected(tmp_path, tiny_base, tiny_finetunes):
    with pytest.raises(CompressError, match="max_windows must be a positive integer"):
        run(tmp_path, tiny_base, tiny_finetunes["alpha"], max_windows=0)
