"""Checkpoint folders read tensor by tensor, and the base fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltastore.checkpoint import FINGERPRINT_FILE, Checkpoint, CheckpointError, fingerprint


def test_open_single_file_lists_tensors(tiny_base: Path) -> None:
    checkpoint = Checkpoint.open(tiny_base)

    assert "model.embed_tokens.weight" in checkpoint.names
    assert "lm_head.weight" not in checkpoint.names
    assert checkpoint.tied_embeddings
    assert checkpoint.shape("model.layers.0.mlp.up_proj.weight") == (88, 48)
    assert checkpoint.dtype("model.norm.weight") == torch.float32
    assert checkpoint.get("model.norm.weight").shape == (48,)


def test_open_sharded_folder(tmp_path: Path) -> None:
    save_file({"a": torch.ones(3, 5)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(7, dtype=torch.bfloat16)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    checkpoint = Checkpoint.open(tmp_path)

    assert checkpoint.names == ["a", "b"]
    assert checkpoint.dtype("b") == torch.bfloat16
    assert torch.equal(checkpoint.get("a"), torch.ones(3, 5))
    assert checkpoint.numel() == 22
    assert checkpoint.nbytes() == 15 * 4 + 7 * 2


def test_index_naming_missing_shard_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "absent.safetensors"}}))
    with pytest.raises(CheckpointError, match="absent.safetensors"):
        Checkpoint.open(tmp_path)


def test_pickle_checkpoint_is_rejected_with_conversion_hint(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*save_pretrained"):
        Checkpoint.open(tmp_path)


def test_missing_folder_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nowhere")


def test_empty_folder_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no \*.safetensors"):
        Checkpoint.open(tmp_path)


def test_damaged_config_is_rejected(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint.open(tmp_path)


def test_unknown_tensor_is_rejected(tiny_base: Path) -> None:
    with pytest.raises(CheckpointError, match="'nope' is not in checkpoint"):
        Checkpoint.open(tiny_base).get("nope")


def test_fingerprint_is_cached_and_stable(tiny_base: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_base, tmp_path / "copy"))
    (copy / FINGERPRINT_FILE).unlink(missing_ok=True)

    first = fingerprint(copy)
    cached = json.loads((copy / FINGERPRINT_FILE).read_text())
    second = fingerprint(copy)

    assert first.startswith("sha256:")
    assert cached["fingerprint"] == first
    assert second == first


def test_fingerprint_changes_with_one_value(tmp_path: Path) -> None:
    weights = {"a": torch.zeros(4, 4), "b": torch.ones(3)}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    save_file(weights, tmp_path / "one" / "model.safetensors")
    weights["a"][2, 3] = 1e-7
    save_file(weights, tmp_path / "two" / "model.safetensors")

    assert fingerprint(tmp_path / "one") != fingerprint(tmp_path / "two")


def test_fingerprint_recomputed_after_weights_change(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(4)}, tmp_path / "model.safetensors")
    first = fingerprint(tmp_path)
    save_file({"a": torch.ones(5)}, tmp_path / "model.safetensors")

    assert fingerprint(tmp_path) != first
