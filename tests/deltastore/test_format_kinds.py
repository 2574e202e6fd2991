"""Structured (rows, columns) entries and int8 values in delta files, and their reading checks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from deltastore import format as fmt
from deltastore.format import DeltaFormatError, SparseEntry, StructuredEntry, read_delta, read_metadata, write_delta

FINGERPRINT = "sha256:" + "cd" * 32


def _write(path: Path, entries: dict, **kwargs) -> fmt.DeltaMetadata:
    options = {"task": "demo", "base_fingerprint": FINGERPRINT, "method": "dare", "params": {"drop_rate": 0.5}}
    options.update(kwargs)
    return write_delta(path, entries=entries, **options)


def _structured(shape: tuple[int, int], axis: int, lines: list[int], *, seed: int = 0) -> StructuredEntry:
    generator = torch.Generator().manual_seed(seed)
    indices = torch.tensor(lines, dtype=torch.int64)
    values = torch.randn(fmt.structured_values_shape(shape, axis, len(lines)), generator=generator) * 1e-3
    return StructuredEntry(shape=shape, axis=axis, indices=indices, values=values)


@pytest.mark.parametrize("axis", [0, 1], ids=["rows", "columns"])
def test_structured_round_trip_exact(tmp_path: Path, axis: int) -> None:
    entry = _structured((37, 53), axis, [0, 4, 5, 36])
    path = tmp_path / "demo.delta.safetensors"
    metadata = _write(path, {"w": entry}, value_dtype="float32")

    decoded = read_delta(path).entries["w"]

    assert isinstance(decoded, StructuredEntry)
    assert decoded.axis == axis
    assert torch.equal(decoded.indices, entry.indices)
    assert torch.equal(decoded.values, entry.values)
    assert metadata.tensors["w"].kind == ("rows" if axis == 0 else "columns")
    assert metadata.tensors["w"].nnz == entry.values.numel()


def test_rows_cost_value_bytes_and_line_numbers(tmp_path: Path) -> None:
    entry = _structured((41, 29), 0, [1, 2, 3, 17, 40])
    metadata = _write(tmp_path / "demo.delta.safetensors", {"w": entry}, value_dtype="float16")

    assert metadata.tensors["w"].nbytes == 2 * 5 * 29 + 4 * 5


@pytest.mark.parametrize("axis", [0, 1], ids=["rows", "columns"])
def test_structured_float16_within_rounding(tmp_path: Path, axis: int) -> None:
    entry = _structured((19, 23), axis, [2, 3, 11])
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": entry}, value_dtype="float16")

    decoded = read_delta(path).entries["w"]

    assert torch.all((decoded.values - entry.values).abs() <= entry.values.abs() * 2**-11)


def test_structured_keeps_no_lines(tmp_path: Path) -> None:
    entry = _structured((7, 5), 0, [])
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": entry})

    decoded = read_delta(path).entries["w"]

    assert decoded.indices.numel() == 0
    assert tuple(decoded.values.shape) == (0, 5)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (StructuredEntry(shape=(3, 4), axis=0, indices=torch.tensor([3]), values=torch.zeros(1, 4)), "outside"),
        (StructuredEntry(shape=(3, 4), axis=0, indices=torch.tensor([1, 1]), values=torch.zeros(2, 4)), "repeated"),
        (StructuredEntry(shape=(3, 4), axis=1, indices=torch.tensor([1]), values=torch.zeros(1, 4)), "shape"),
        (StructuredEntry(shape=(12,), axis=0, indices=torch.tensor([1]), values=torch.zeros(1)), "2-D"),
        (StructuredEntry(shape=(3, 4), axis=2, indices=torch.tensor([1]), values=torch.zeros(1, 4)), "axis"),
    ],
    ids=["out-of-range", "repeated", "wrong-values-shape", "not-2d", "bad-axis"],
)
def test_structured_invalid_entry_rejected(tmp_path: Path, entry: StructuredEntry, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _write(tmp_path / "demo.delta.safetensors", {"w": entry})


def test_int8_round_trip_within_half_scale(tmp_path: Path) -> None:
    # 2,500 values span three int8 blocks, the last one partial, with magnitudes that differ per block.
    generator = torch.Generator().manual_seed(3)
    indices = torch.randperm(61 * 97, generator=generator)[:2500].sort().values
    values = torch.randn(2500, generator=generator) * 1e-3
    values[1024:2048] *= 50.0
    entry = SparseEntry(shape=(61, 97), indices=indices, values=values)
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": entry}, value_dtype="int8")

    decoded = read_delta(path).entries["w"]

    assert torch.equal(decoded.indices, indices)
    for block in range(3):
        part = slice(block * fmt.INT8_BLOCK, (block + 1) * fmt.INT8_BLOCK)
        scale = float(values[part].abs().max()) / fmt.INT8_MAX
        error = (decoded.values[part] - values[part]).abs().max()
        assert float(error) <= scale / 2 * (1 + 1e-5), block


def test_int8_values_cost_three_bytes(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(4)
    indices = torch.randperm(300 * 301, generator=generator)[:5000].sort().values
    entry = SparseEntry(shape=(300, 301), indices=indices, values=torch.randn(5000, generator=generator))
    metadata = _write(tmp_path / "demo.delta.safetensors", {"w": entry}, value_dtype="int8")

    blocks = -(-300 * 301 // fmt.BLOCK_SIZE)
    scales = -(-5000 // fmt.INT8_BLOCK)
    assert metadata.tensors["w"].nbytes == 3 * 5000 + 4 * blocks + 4 * scales


def test_int8_rows_round_trip(tmp_path: Path) -> None:
    entry = _structured((31, 45), 0, [0, 9, 30])
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": entry}, value_dtype="int8")

    decoded = read_delta(path).entries["w"]

    scale = float(entry.values.abs().max()) / fmt.INT8_MAX
    assert float((decoded.values - entry.values).abs().max()) <= scale / 2 * (1 + 1e-5)


def test_int8_zero_values_stay_zero(tmp_path: Path) -> None:
    entry = SparseEntry(shape=(5, 5), indices=torch.tensor([0, 7]), values=torch.zeros(2))
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": entry}, value_dtype="int8")

    assert torch.equal(read_delta(path).entries["w"].values, torch.zeros(2))


def _rewrite_metadata(path: Path, change) -> None:
    """Edit the deltamux record of a file in place, keeping the header the same length or padding it."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    record = json.loads(header["__metadata__"]["deltamux"])
    change(record)
    header["__metadata__"]["deltamux"] = json.dumps(record, sort_keys=True)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + blob[8 + length :])


def test_unknown_kind_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _structured((6, 4), 0, [1])})
    _rewrite_metadata(path, lambda record: record["tensors"]["w"].update(kind="diagonal"))

    with pytest.raises(DeltaFormatError, match="unknown kind 'diagonal'"):
        read_metadata(path)


def test_rows_kind_on_sparse_arrays_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": SparseEntry(shape=(6, 4), indices=torch.tensor([3]), values=torch.tensor([1.0]))})
    _rewrite_metadata(path, lambda record: record["tensors"]["w"].update(kind="rows"))

    with pytest.raises(DeltaFormatError, match="missing its array 'w:lines'"):
        read_metadata(path)


def test_int8_relabelled_float16_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.delta.safetensors"
    _write(path, {"w": _structured((6, 4), 0, [1, 2])}, value_dtype="int8")
    _rewrite_metadata(path, lambda record: record["tensors"]["w"].update(value_dtype="float16"))

    with pytest.raises(DeltaFormatError, match="is I8 .* expected F16"):
        read_delta(path)


def test_int8_empty_entries_round_trip(tmp_path: Path) -> None:
    entries = {
        "nothing_kept": SparseEntry(shape=(3, 3), indices=torch.zeros(0, dtype=torch.int64), values=torch.zeros(0)),
        "no_rows": _structured((4, 5), 0, []),
        "empty": SparseEntry(shape=(0, 4), indices=torch.zeros(0, dtype=torch.int64), values=torch.zeros(0)),
    }
    path = tmp_path / "demo.delta.safetensors"
    _write(path, entries, value_dtype="int8")

    decoded = read_delta(path).entries

    assert decoded["nothing_kept"].values.numel() == 0
    assert tuple(decoded["no_rows"].values.shape) == (0, 5)
    assert decoded["empty"].values.numel() == 0
