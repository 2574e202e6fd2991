"""Delta file encoding, decoding and the checks that reject damaged or hostile files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors_bytes

from deltastore import format as fmt
from deltastore.format import (
    DeltaFormatError,
    DenseEntry,
    FingerprintMismatch,
    SparseEntry,
    delta_file_name,
    read_delta,
    read_metadata,
    validate_task_name,
    write_delta,
)

FINGERPRINT = "sha256:" + "ab" * 32


def _sparse(shape: tuple[int, ...], nnz: int, *, seed: int = 0, magnitude: float = 1e-3) -> SparseEntry:
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for size in shape:
        numel *= size
    indices = torch.randperm(numel, generator=generator)[:nnz].sort().values
    values = torch.randn(nnz, generator=generator) * magnitude
    return SparseEntry(shape=shape, indices=indices, values=values)


def _write(path: Path, entries: dict, **kwargs) -> fmt.DeltaMetadata:
    options = {"task": "demo", "base_fingerprint": FINGERPRINT, "method": "dare", "params": {"drop_rate": 0.9, "seed": 0}}
    options.update(kwargs)
    return write_delta(path, entries=entries, **options)


def test_round_trip_float32_is_exact(tmp_path: Path) -> None:
    # 3 blocks of 65,536 positions, so block-local offsets and counts are exercised.
    entry = _sparse((131, 1537), 9001)
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"layer.weight": entry}, value_dtype="float32")

    decoded = read_delta(path).entries["layer.weight"]

    assert torch.equal(decoded.indices, entry.indices)
    assert torch.equal(decoded.values, entry.values)


@pytest.mark.parametrize(("value_dtype", "relative"), [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_round_trip_half_values_within_rounding(tmp_path: Path, value_dtype: str, relative: float) -> None:
    entry = _sparse((37, 53), 400, magnitude=3e-5)
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": entry}, value_dtype=value_dtype)

    decoded = read_delta(path).entries["w"]

    assert torch.equal(decoded.indices, entry.indices)
    assert torch.all((decoded.values - entry.values).abs() <= entry.values.abs() * relative)


def test_float16_values_cost_four_bytes(tmp_path: Path) -> None:
    entry = _sparse((576, 1536), 8847)
    metadata = _write(tmp_path / "demo.delta.safetensors", {"w": entry})

    info = metadata.tensors["w"]
    blocks = -(-576 * 1536 // fmt.BLOCK_SIZE)
    assert info.nbytes == 4 * info.nnz + 4 * blocks


def test_dense_empty_and_tiny_entries_round_trip(tmp_path: Path) -> None:
    entries = {
        "norm.weight": DenseEntry(shape=(5,), values=torch.tensor([0.5, -1.0, 0.0, 2.0, 1e-6])),
        "empty.weight": SparseEntry(shape=(0, 4), indices=torch.zeros(0, dtype=torch.int64), values=torch.zeros(0)),
        "nothing_kept.weight": SparseEntry(shape=(3, 3), indices=torch.zeros(0, dtype=torch.int64), values=torch.zeros(0)),
        "one.weight": SparseEntry(shape=(1,), indices=torch.tensor([0]), values=torch.tensor([0.25])),
    }
    path = tmp_path / "demo.delta.safetensors"
    _write(path, entries)

    delta = read_delta(path)

    assert torch.equal(delta.entries["norm.weight"].values, entries["norm.weight"].values)
    assert delta.entries["empty.weight"].indices.numel() == 0
    assert delta.entries["nothing_kept.weight"].values.numel() == 0
    assert delta.entries["one.weight"].values.tolist() == [0.25]
    assert delta.metadata.nnz == 5 + 0 + 0 + 1


def test_metadata_records_method_and_params(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _sparse((10, 10), 7)}, method="darex-q", params={"drop_rate": 0.99, "q": 0.3, "seed": 4}, extra={"base_numel": 1234})

    metadata = read_metadata(path)

    assert metadata.format_version == fmt.FORMAT_VERSION
    assert metadata.method == "darex-q"
    assert metadata.params == {"drop_rate": 0.99, "q": 0.3, "seed": 4}
    assert metadata.base_fingerprint == FINGERPRINT
    assert metadata.tensors["w"].nnz == 7
    assert metadata.extra == {"base_numel": 1234}


def test_unsorted_indices_are_sorted_on_write(tmp_path: Path) -> None:
    entry = SparseEntry(shape=(4, 5), indices=torch.tensor([7, 2, 19]), values=torch.tensor([1.0, 2.0, 3.0]))
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": entry}, value_dtype="float32")

    decoded = read_delta(path).entries["w"]

    assert decoded.indices.tolist() == [2, 7, 19]
    assert decoded.values.tolist() == [2.0, 1.0, 3.0]


@pytest.mark.parametrize(
    "entry",
    [
        SparseEntry(shape=(2, 2), indices=torch.tensor([4]), values=torch.tensor([1.0])),
        SparseEntry(shape=(2, 2), indices=torch.tensor([1, 1]), values=torch.tensor([1.0, 2.0])),
        SparseEntry(shape=(2, 2), indices=torch.tensor([0]), values=torch.tensor([float("nan")])),
        SparseEntry(shape=(2, 2), indices=torch.tensor([0, 1]), values=torch.tensor([1.0])),
        DenseEntry(shape=(3,), values=torch.tensor([1.0, float("inf"), 0.0])),
        DenseEntry(shape=(3,), values=torch.zeros(4)),
    ],
    ids=["index-out-of-range", "repeated-index", "nan-value", "length-mismatch", "inf-dense", "dense-shape"],
)
def test_write_rejects_invalid_entries(tmp_path: Path, entry) -> None:
    path = tmp_path / "demo.delta.safetensors"
    with pytest.raises(ValueError):
        _write(path, {"w": entry})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("task", ["", "../evil", "a/b", "/abs", "a..b", ".hidden", "x" * 65, "tab\tname", "naïve"])
def test_task_name_allowlist_rejects(task: str) -> None:
    with pytest.raises(ValueError, match="invalid task name"):
        validate_task_name(task)


def test_task_name_allowlist_accepts() -> None:
    assert delta_file_name("sentiment-v2.1_a") == "sentiment-v2.1_a.delta.safetensors"


def test_expected_fingerprint_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _sparse((4, 4), 3)})

    with pytest.raises(FingerprintMismatch, match="compress the fine-tune again"):
        read_delta(path, expected_fingerprint="sha256:" + "cd" * 32)


def test_altered_payload_fails_checksum(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _sparse((40, 40), 300)})
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01
    path.write_bytes(bytes(blob))

    with pytest.raises(DeltaFormatError, match="checksum mismatch"):
        read_delta(path)


def test_altered_metadata_fails_checksum(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _sparse((40, 40), 300)}, params={"drop_rate": 0.9})
    blob = path.read_bytes().replace(b'\\"drop_rate\\": 0.9', b'\\"drop_rate\\": 0.8')
    path.write_bytes(blob)

    with pytest.raises(DeltaFormatError, match="checksum mismatch"):
        read_delta(path)


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _sparse((40, 40), 300)})
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(DeltaFormatError, match="truncated|past the end"):
        read_metadata(path)


@pytest.mark.parametrize("size", [0, 5])
def test_tiny_file_is_rejected(tmp_path: Path, size: int) -> None:
    path = tmp_path / "demo.delta.safetensors"
    path.write_bytes(b"\x00" * size)
    with pytest.raises(DeltaFormatError, match="too short"):
        read_metadata(path)


def test_oversized_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(DeltaFormatError, match="-byte header; the limit is"):
        read_metadata(path)


def test_header_longer_than_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(DeltaFormatError, match="truncated"):
        read_metadata(path)


def _raw_file(path: Path, header: dict, payload: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def test_overlapping_arrays_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    header = {
        "a:dense": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b:dense": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _raw_file(path, header, b"\x00" * 12)
    with pytest.raises(DeltaFormatError, match="overlap"):
        read_metadata(path)


def test_offsets_past_end_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    header = {"a:dense": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    _raw_file(path, header, b"\x00" * 8)
    with pytest.raises(DeltaFormatError, match="past the end"):
        read_metadata(path)


def test_header_not_json_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(DeltaFormatError, match="not valid JSON"):
        read_metadata(path)


def test_plain_safetensors_is_not_a_delta(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(save_safetensors_bytes({"w": torch.zeros(3)}))
    with pytest.raises(DeltaFormatError, match="not a deltamux delta"):
        read_metadata(path)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DeltaFormatError, match="not found"):
        read_delta(tmp_path / "absent.delta.safetensors")


def test_future_format_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _sparse((4, 4), 3)})
    blob = path.read_bytes().replace(b'\\"format_version\\": 1', b'\\"format_version\\": 9')
    path.write_bytes(blob)
    with pytest.raises(DeltaFormatError, match="format version 9"):
        read_metadata(path)


def test_index_out_of_range_with_valid_checksum_is_rejected(tmp_path: Path) -> None:
    """A crafted file whose checksum matches but whose offsets point past the tensor."""
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": SparseEntry(shape=(3, 3), indices=torch.tensor([8]), values=torch.tensor([1.0]))})
    metadata = read_metadata(path)
    arrays = {
        "w:counts": torch.tensor([1], dtype=torch.int32),
        "w:offsets": torch.tensor([9], dtype=torch.int16),  # position 9 of a 9-element tensor
        "w:values": torch.tensor([1.0], dtype=torch.float16),
    }
    forged = fmt.dataclasses.replace(metadata, payload_sha256=fmt._checksum(metadata, arrays))
    path.write_bytes(save_safetensors_bytes(arrays, metadata={fmt.METADATA_KEY: json.dumps(forged.to_json())}))

    with pytest.raises(DeltaFormatError, match="outside its 9 elements"):
        read_delta(path)


def test_failed_write_leaves_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _sparse((4, 4), 3)})
    before = path.read_bytes()

    with pytest.raises(ValueError):
        _write(path, {"w": SparseEntry(shape=(2, 2), indices=torch.tensor([9]), values=torch.tensor([1.0]))})

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.delta.safetensors"]


def test_duplicate_header_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    text = b'{"a:dense": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a:dense": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x00" * 4)
    with pytest.raises(DeltaFormatError, match="repeats the keys"):
        read_metadata(path)


@pytest.mark.parametrize("shape", [[True], [2.0], ["2"]], ids=["bool", "float", "string"])
def test_non_integer_header_shape_is_rejected(tmp_path: Path, shape: list) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _raw_file(path, {"a:dense": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}, b"\x00" * 8)
    with pytest.raises(DeltaFormatError, match="invalid shape"):
        read_metadata(path)


def test_non_integer_metadata_nnz_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _sparse((4, 4), 3)})
    original = path.read_bytes()
    blob = original.replace(b'\\"nnz\\": 3', b'\\"nnz\\": 3.0')
    assert len(blob) == len(original) + 2
    path.write_bytes(struct.pack("<Q", int.from_bytes(blob[:8], "little") + 2) + blob[8:])
    with pytest.raises(DeltaFormatError, match="not a non-negative integer"):
        read_metadata(path)


def test_written_file_is_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    old = os.umask(0o022)
    try:
        _write(path, {"w": _sparse((4, 4), 3)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
