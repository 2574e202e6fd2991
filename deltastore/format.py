"""The delta file: one safetensors file per task, holding compact sparse tensors.

safetensors stores only dense arrays, so a sparse delta tensor is stored as three arrays:

- `NAME:counts`  int32, one entry per block of 65,536 flat positions: how many values the block keeps;
- `NAME:offsets` int16, the position of each kept value inside its block (read as unsigned);
- `NAME:values`  float16 (default), bfloat16 or float32, the kept values in position order.

With float16 values that is 4 bytes per kept value plus 4 bytes per block. float16 values are
stored divided by a per-tensor power of two (`scale`), so small deltas keep full float16
precision instead of falling into its subnormal range; dividing by a power of two is exact.
Tensors kept in full are stored as `NAME:dense` float32 deltas.

Structurally pruned 2-D tensors keep whole rows (kind `rows`) or whole columns (kind `columns`):
`NAME:lines` int32 holds the kept row (or column) numbers and `NAME:values` the kept lines as one
2-D array, so a kept value costs its value bytes only. With the `int8` value dtype, values are
stored as symmetric int8 with one float32 scale per block of `INT8_BLOCK` values
(`NAME:scales`), in storage order, for sparse, rows and columns tensors alike.

All other facts live in one JSON object under the `deltamux` key of the safetensors metadata:
format version, task, base fingerprint, method and parameters, per-tensor kind, shape, nnz,
value dtype and scale, and a SHA-256 checksum over that object and every stored array. The full
layout is documented in docs/format.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes

FORMAT_VERSION = 1
BLOCK_SIZE = 1 << 16  # flat positions per block, so an offset fits in 16 bits
METADATA_KEY = "deltamux"
MAX_HEADER_BYTES = 64 << 20  # a delta header with a million tensors stays well below this
FILE_SUFFIX = ".delta.safetensors"
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}
INT8_BLOCK = 1024  # values that share one int8 scale: 4 bytes of scale per 1024 values
INT8_MAX = 127
# Entry kinds and, for the structured kinds, the axis whose lines are kept whole.
STRUCTURED_AXES = {"rows": 0, "columns": 1}
KINDS = ("sparse", "dense", *STRUCTURED_AXES)
_STORED_VALUE_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int8": "I8"}

# The fix named by messages about a file that is not a delta file. The drop rate is the README's example.
MAKE_DELTA_HINT = (
    "make a delta file from a fine-tune with `deltamux compress --base BASE --finetuned FINETUNED "
    "--task TASK --store DIR --method dare --drop-rate 0.99`"
)
_SNIFF_BYTES = 4096  # bytes read to describe a file that is not a delta file
_SHOWN_BYTES = 16  # of those, how many a message shows

_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_STORED_DTYPES = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
}


class DeltaFormatError(ValueError):
    """A delta file is malformed, truncated, altered, or does not fit the base it is used with."""


class NotADeltaFile(DeltaFormatError):
    """A file that is no deltamux delta at all: not safetensors, or safetensors without deltamux metadata."""


class FingerprintMismatch(DeltaFormatError):
    """A delta file was made for a different base checkpoint."""


@dataclass(frozen=True)
class SparseEntry:
    """A pruned delta tensor: sorted unique flat positions and their float32 values."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,) float32


@dataclass(frozen=True)
class DenseEntry:
    """A delta tensor kept in full, in float32."""

    shape: tuple[int, ...]
    values: torch.Tensor  # (*shape) float32


@dataclass(frozen=True)
class StructuredEntry:
    """A 2-D delta pruned by whole rows (axis 0) or whole columns (axis 1).

    `indices` are the kept row (or column) numbers, sorted and unique; `values` holds those lines
    in full: shape (len(indices), shape[1]) for rows, (shape[0], len(indices)) for columns.
    """

    shape: tuple[int, ...]
    axis: int
    indices: torch.Tensor  # (lines,) int64
    values: torch.Tensor  # (lines, in) or (out, lines) float32

    @property
    def kind(self) -> str:
        return "rows" if self.axis == 0 else "columns"


Entry = SparseEntry | DenseEntry | StructuredEntry


def structured_values_shape(shape: tuple[int, ...], axis: int, lines: int) -> tuple[int, int]:
    """Return the shape of the stored values of a structured entry that keeps `lines` lines."""
    rows, columns = shape
    return (lines, columns) if axis == 0 else (rows, lines)


@dataclass(frozen=True)
class TensorInfo:
    """Per-tensor facts from the file's metadata."""

    kind: str  # "sparse", "dense", "rows" or "columns"
    shape: tuple[int, ...]
    nnz: int
    value_dtype: str
    scale: float = 1.0
    nbytes: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class DeltaMetadata:
    """The facts a delta file stores about itself, readable without loading its arrays."""

    format_version: int
    task: str
    base_fingerprint: str
    method: str
    params: dict
    tensors: dict[str, TensorInfo]
    payload_sha256: str
    created: str
    extra: dict = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        return sum(info.nnz for info in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def to_json(self) -> dict:
        record = asdict(self)
        record["tensors"] = {name: {**asdict(info), "shape": list(info.shape)} for name, info in self.tensors.items()}
        return record


@dataclass(frozen=True)
class DeltaFile:
    """A delta file read and checked: its metadata and its decoded entries (CPU)."""

    path: Path
    metadata: DeltaMetadata
    entries: dict[str, Entry]


def validate_task_name(task: str) -> str:
    """Return `task` if it is a safe task name, else raise ValueError.

    Names start with a letter or digit and use only letters, digits, '.', '_' and '-', at most
    64 characters, and never contain '..'; so a name can never point outside the store folder.
    """
    if not isinstance(task, str) or not _TASK_NAME.fullmatch(task) or ".." in task:
        raise ValueError(
            f"invalid task name {task!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return task


def delta_file_name(task: str) -> str:
    """Return the file name of `task`'s delta inside a store folder."""
    return validate_task_name(task) + FILE_SUFFIX


# ---------------------------------------------------------------------------------------------
# Writing


def write_delta(
    path: str | Path,
    *,
    task: str,
    base_fingerprint: str,
    method: str,
    params: Mapping,
    entries: Mapping[str, Entry],
    value_dtype: str = "float16",
    extra: Mapping | None = None,
) -> DeltaMetadata:
    """Encode `entries` and write them to `path` atomically (temporary file, fsync, rename)."""
    validate_task_name(task)
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"invalid value dtype {value_dtype!r}; choose one of {sorted(VALUE_DTYPES)}")
    if not base_fingerprint.startswith("sha256:"):
        raise ValueError(f"invalid base fingerprint {base_fingerprint!r}; expected 'sha256:<hex>'")

    # 1. Encode each entry into the arrays that will be stored.
    arrays: dict[str, torch.Tensor] = {}
    infos: dict[str, TensorInfo] = {}
    for name in sorted(entries):
        if ":" in name:
            raise ValueError(f"invalid tensor name {name!r}: ':' separates a tensor name from its array role")
        encoded, info = _encode_entry(name, entries[name], value_dtype)
        arrays.update(encoded)
        infos[name] = info

    # 2. The checksum covers the metadata (without the checksum itself) and every array.
    metadata = DeltaMetadata(
        format_version=FORMAT_VERSION,
        task=task,
        base_fingerprint=base_fingerprint,
        method=method,
        params=json.loads(json.dumps(dict(params))),
        tensors=infos,
        payload_sha256="",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra=json.loads(json.dumps(dict(extra or {}))),
    )
    checksum = _checksum(metadata, arrays)
    metadata = dataclasses.replace(metadata, payload_sha256=checksum)

    # 3. Serialize, then publish with a rename so readers never see a partial file.
    blob = save_safetensors_bytes(arrays, metadata={METADATA_KEY: json.dumps(metadata.to_json(), sort_keys=True)})
    write_atomic(Path(path), blob)
    return metadata


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file as 0600; give it the mode an ordinary new file gets under the umask,
        # so a server running as another user (a container's, say) can read it.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _encode_entry(name: str, entry: Entry, value_dtype: str) -> tuple[dict[str, torch.Tensor], TensorInfo]:
    shape = tuple(int(s) for s in entry.shape)
    numel = math.prod(shape)
    if isinstance(entry, DenseEntry):
        values = entry.values.detach().to("cpu", torch.float32).contiguous()
        if tuple(values.shape) != shape:
            raise ValueError(f"dense entry {name!r} has values of shape {tuple(values.shape)}, expected {shape}")
        _check_finite(name, values)
        return {f"{name}:dense": values}, TensorInfo("dense", shape, numel, "float32", 1.0, values.numel() * 4)
    if isinstance(entry, StructuredEntry):
        return _encode_structured(name, entry, shape, value_dtype)
    if not isinstance(entry, SparseEntry):
        raise TypeError(f"entry {name!r} is a {type(entry).__name__}; expected SparseEntry, DenseEntry or StructuredEntry")

    indices = entry.indices.detach().to("cpu", torch.int64).reshape(-1)
    values = entry.values.detach().to("cpu", torch.float32).reshape(-1)
    if indices.numel() != values.numel():
        raise ValueError(f"sparse entry {name!r} has {indices.numel()} indices but {values.numel()} values")
    if indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= numel:
            raise ValueError(f"sparse entry {name!r} has indices outside [0, {numel}) for shape {shape}")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            order = torch.argsort(indices)
            indices, values = indices[order], values[order]
            if not bool((indices[1:] > indices[:-1]).all()):
                raise ValueError(f"sparse entry {name!r} has repeated indices")
    _check_finite(name, values)

    # Block-local offsets: block = index >> 16, offset = index & 0xFFFF, stored as int16 bits.
    blocks = max(1, -(-numel // BLOCK_SIZE))
    counts = torch.bincount(indices >> 16, minlength=blocks).to(torch.int32)
    offsets = indices & 0xFFFF
    offsets = torch.where(offsets >= 1 << 15, offsets - (1 << 16), offsets).to(torch.int16)

    value_arrays, scale = _encode_values(name, values, value_dtype)
    arrays = {f"{name}:counts": counts, f"{name}:offsets": offsets, **value_arrays}
    return arrays, TensorInfo("sparse", shape, int(indices.numel()), value_dtype, scale, _nbytes(arrays))


def _encode_structured(
    name: str, entry: StructuredEntry, shape: tuple[int, ...], value_dtype: str
) -> tuple[dict[str, torch.Tensor], TensorInfo]:
    if len(shape) != 2 or entry.axis not in (0, 1):
        raise ValueError(
            f"structured entry {name!r} needs a 2-D shape and axis 0 (rows) or 1 (columns), "
            f"got shape {shape} and axis {entry.axis!r}"
        )
    lines = entry.indices.detach().to("cpu", torch.int64).reshape(-1)
    values = entry.values.detach().to("cpu", torch.float32)
    expected = structured_values_shape(shape, entry.axis, lines.numel())
    if tuple(values.shape) != expected:
        raise ValueError(f"{entry.kind} entry {name!r} has values of shape {tuple(values.shape)}, expected {expected}")
    if lines.numel():
        if int(lines.min()) < 0 or int(lines.max()) >= shape[entry.axis]:
            raise ValueError(f"{entry.kind} entry {name!r} keeps lines outside [0, {shape[entry.axis]}) for shape {shape}")
        if lines.numel() > 1 and not bool((lines[1:] > lines[:-1]).all()):
            raise ValueError(f"{entry.kind} entry {name!r} has unsorted or repeated line numbers")
    _check_finite(name, values)

    value_arrays, scale = _encode_values(name, values.contiguous(), value_dtype)
    arrays = {f"{name}:lines": lines.to(torch.int32), **value_arrays}
    return arrays, TensorInfo(entry.kind, shape, values.numel(), value_dtype, scale, _nbytes(arrays))


def _nbytes(arrays: Mapping[str, torch.Tensor]) -> int:
    return sum(array.numel() * array.element_size() for array in arrays.values())


def _encode_values(name: str, values: torch.Tensor, value_dtype: str) -> tuple[dict[str, torch.Tensor], float]:
    """Return the stored value arrays (`NAME:values`, and `NAME:scales` for int8) and the tensor scale."""
    if value_dtype == "int8":
        return _encode_int8(name, values), 1.0
    scale = 1.0
    if value_dtype == "float16" and values.numel():
        peak = float(values.abs().max())
        if peak > 0:
            # A power of two that brings the largest magnitude to [2^14, 2^15): well inside float16's range.
            scale = 2.0 ** (math.floor(math.log2(peak)) - 14)
    stored_values = (values / scale).to(VALUE_DTYPES[value_dtype])
    if not bool(torch.isfinite(stored_values).all()):
        raise ValueError(f"entry {name!r} overflows {value_dtype}; store it with value dtype float32")
    return {f"{name}:values": stored_values}, scale


def _encode_int8(name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantize `values` to symmetric int8, one float32 scale per INT8_BLOCK values in storage order.

    Each block's scale is its largest magnitude over 127, so a decoded value is within half a
    scale of the original and the largest one is exact up to float32 rounding.
    """
    flat = values.reshape(-1)
    blocks = -(-flat.numel() // INT8_BLOCK)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32)
    padded[: flat.numel()] = flat
    padded = padded.view(blocks, INT8_BLOCK)  # (blocks, INT8_BLOCK)
    scales = padded.abs().amax(dim=1) / INT8_MAX  # (blocks,)
    # An all-zero block keeps scale 0; dividing by 1 there leaves its zeros unchanged.
    quantized = torch.round(padded / torch.where(scales > 0, scales, 1.0).unsqueeze(1)).clamp_(-INT8_MAX, INT8_MAX)
    stored = quantized.reshape(-1)[: flat.numel()].to(torch.int8).view(values.shape)
    return {f"{name}:values": stored, f"{name}:scales": scales.contiguous()}


def _check_finite(name: str, values: torch.Tensor) -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"entry {name!r} contains {bad} NaN or infinite values; check the fine-tuned checkpoint")


def _checksum(metadata: DeltaMetadata, arrays: Mapping[str, torch.Tensor]) -> str:
    record = metadata.to_json()
    record["payload_sha256"] = ""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    for key in sorted(arrays):
        array = arrays[key].contiguous()
        digest.update(json.dumps([key, str(array.dtype), list(array.shape)]).encode())
        if array.numel():
            digest.update(array.view(torch.uint8).reshape(-1).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading


def read_metadata(path: str | Path) -> DeltaMetadata:
    """Read and check the header of a delta file without loading its arrays."""
    path = Path(path)
    with _open(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        header = _read_header(path, handle, size)
    return _parse_metadata(path, header)


def read_delta(path: str | Path, *, expected_fingerprint: str | None = None) -> DeltaFile:
    """Read a delta file, verify its checksum (and base fingerprint if given) and decode it."""
    path = Path(path)
    with _open(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        header = _read_header(path, handle, size)
        metadata = _parse_metadata(path, header)
        if expected_fingerprint is not None and metadata.base_fingerprint != expected_fingerprint:
            raise FingerprintMismatch(
                f"{path.name!r} was made for base {metadata.base_fingerprint!r}, but the base in use is "
                f"{expected_fingerprint!r}; compress the fine-tune again against this base"
            )

    # load_file memory-maps the file, so peak memory is the arrays once, not the file plus the arrays.
    # A file replaced after the header check still has to match the checksum below.
    try:
        arrays = load_safetensors_file(path)
    except Exception as e:  # safetensors raises its own error type for a bad payload
        raise DeltaFormatError(f"cannot decode the arrays of {path.name!r}: {e}") from e
    expected_keys = {key for name, info in metadata.tensors.items() for key in _array_keys(name, info)}
    if set(arrays) != expected_keys:
        extra = sorted(set(arrays) - expected_keys)[:5]
        missing = sorted(expected_keys - set(arrays))[:5]
        raise DeltaFormatError(f"{path.name!r} arrays do not match its metadata (unexpected {extra!r}, missing {missing!r})")
    if _checksum(metadata, arrays) != metadata.payload_sha256:
        raise DeltaFormatError(
            f"checksum mismatch in {path.name!r}: the file was altered or damaged after it was written; "
            "write it again with `deltamux compress`"
        )

    entries = {name: _decode_entry(path, name, info, arrays) for name, info in metadata.tensors.items()}
    return DeltaFile(path=path, metadata=metadata, entries=entries)


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise DeltaFormatError(f"delta file {str(path)!r} not found") from e
    except IsADirectoryError as e:
        raise DeltaFormatError(f"{str(path)!r} is a folder, not a delta file") from e
    except OSError as e:
        raise DeltaFormatError(f"cannot read delta file {str(path)!r}: {e.strerror}") from e


def _read_header(path: Path, handle, size: int) -> dict:
    """Parse the safetensors header and check that its array extents are sane and disjoint."""
    # 1. The 8-byte header length. A file without the safetensors layout raises NotADeltaFile, which
    # shows what the file contains. A damaged safetensors file gets the precise message.
    head = handle.read(_SNIFF_BYTES)
    handle.seek(0)
    if size < 8:
        raise _not_safetensors(path, head, size, reason="it is too short for a safetensors file, which starts with an 8-byte header length")
    (length,) = struct.unpack("<Q", handle.read(8))
    if length > MAX_HEADER_BYTES or 8 + length > size:
        if not _starts_like_safetensors(head):
            raise _not_safetensors(path, head, size, reason="its first 8 bytes are not the length of a JSON header inside the file")
        if length > MAX_HEADER_BYTES:
            raise DeltaFormatError(f"{path.name!r} declares a {length}-byte header; the limit is {MAX_HEADER_BYTES} bytes")
        raise DeltaFormatError(f"{path.name!r} is truncated: its header needs {length} bytes but the file has {size - 8}")

    # 2. The JSON header and the extents of its arrays.
    try:
        header = json.loads(handle.read(length), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        if not _starts_like_safetensors(head):
            raise _not_safetensors(
                path, head, size, reason=f"its first 8 bytes give a {length}-byte header, which is not valid JSON"
            ) from e
        raise DeltaFormatError(f"{path.name!r} has a header that is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise DeltaFormatError(f"{path.name!r} has a header that is not a JSON object")

    data_size = size - 8 - length
    extents = []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise DeltaFormatError(f"{path.name!r}: array {key!r} has an invalid header entry") from e
        if dtype_name not in _STORED_DTYPES:
            raise DeltaFormatError(f"{path.name!r}: array {key!r} has dtype {dtype_name!r}, which delta files never use")
        if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
            raise DeltaFormatError(f"{path.name!r}: array {key!r} has an invalid shape {shape!r}")
        if not (_is_count(begin) and _is_count(end) and begin <= end <= data_size):
            raise DeltaFormatError(
                f"{path.name!r}: array {key!r} spans bytes [{begin!r}, {end!r}) past the end of the "
                f"{data_size}-byte payload; the file is truncated or damaged"
            )
        if end - begin != math.prod(shape) * _STORED_DTYPES[dtype_name][1]:
            raise DeltaFormatError(f"{path.name!r}: array {key!r} has {end - begin} bytes for shape {shape} of {dtype_name}")
        extents.append((begin, end, key))
    extents.sort()
    for (_, end, key), (begin, _, other) in zip(extents, extents[1:]):
        if begin < end:
            raise DeltaFormatError(f"{path.name!r}: arrays {key!r} and {other!r} overlap in the payload")
    return header


def _starts_like_safetensors(head: bytes) -> bool:
    """Tell whether a file's first bytes have the safetensors layout: a binary length, then '{'.

    A header length below 2^56 has a zero top byte, but text never contains a zero byte. The header
    is a JSON object, so its first byte other than a space is '{'.
    """
    return b"\x00" in head[:8] and head[8:].lstrip()[:1] == b"{"


def _not_safetensors(path: Path, head: bytes, size: int, *, reason: str) -> NotADeltaFile:
    return NotADeltaFile(
        f"{path.name!r} is not a safetensors file, so it is not a deltamux delta file: {reason} "
        f"(found {describe_contents(head, size=size)}); {MAKE_DELTA_HINT}"
    )


def describe_contents(head: bytes, *, size: int) -> str:
    """Describe a file by its size and first bytes: text quoted, binary data in hex, cut to _SHOWN_BYTES.

    `head` is the start of the file (up to _SNIFF_BYTES bytes) and `size` its full length.
    """
    if size == 0:
        return "an empty file"
    length = f"{size} byte" if size == 1 else f"{size} bytes"
    text = _as_text(head)
    if text is None:
        return f"{length} of binary data starting with {head[:_SHOWN_BYTES].hex(' ')}"
    kind = "JSON text" if text.lstrip()[:1] in ("{", "[") else "text"
    return f"{length} of {kind} starting with {text[:_SHOWN_BYTES]!r}"


def _as_text(head: bytes) -> str | None:
    """Decode the start of a file as UTF-8 text; None for binary data (control bytes or invalid UTF-8)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end of the sample
            return None
        text = head[: e.start].decode("utf-8")
    if any(ord(char) < 32 and char not in "\t\n\r" for char in text):
        return None
    return text


def _is_count(value: object) -> bool:
    """Return True for a non-negative JSON integer; JSON booleans parse as Python bools and are rejected."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise DeltaFormatError(f"the header repeats the keys {repeated[:5]!r}; a valid file names each array once")
    return dict(pairs)


def _parse_metadata(path: Path, header: dict) -> DeltaMetadata:
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY) if isinstance(header.get("__metadata__"), dict) else None
    if raw is None:
        raise NotADeltaFile(
            f"{path.name!r} is a safetensors file but not a deltamux delta file: it has no {METADATA_KEY!r} "
            f"metadata, so it is probably a model checkpoint; {MAKE_DELTA_HINT}"
        )
    try:
        record = json.loads(raw)
        version = record["format_version"]
        if version != FORMAT_VERSION:
            raise DeltaFormatError(
                f"{path.name!r} has format version {version!r}; this deltamux reads version {FORMAT_VERSION}"
            )
        tensors = {}
        for name, info in record["tensors"].items():
            counts = [*info["shape"], info["nnz"], info.get("nbytes", 0)]
            if not all(_is_count(value) for value in counts):
                raise DeltaFormatError(f"{path.name!r}: tensor {name!r} has a shape, nnz or nbytes that is not a non-negative integer")
            tensor = TensorInfo(
                kind=str(info["kind"]),
                shape=tuple(int(s) for s in info["shape"]),
                nnz=int(info["nnz"]),
                value_dtype=str(info["value_dtype"]),
                scale=float(info.get("scale", 1.0)),
                nbytes=int(info.get("nbytes", 0)),
            )
            _check_info(path, name, tensor, header)
            tensors[name] = tensor
        metadata = DeltaMetadata(
            format_version=version,
            task=validate_task_name(record["task"]),
            base_fingerprint=str(record["base_fingerprint"]),
            method=str(record["method"]),
            params=dict(record["params"]),
            tensors=tensors,
            payload_sha256=str(record["payload_sha256"]),
            created=str(record.get("created", "")),
            extra=dict(record.get("extra") or {}),
        )
    except DeltaFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DeltaFormatError(f"{path.name!r} has invalid deltamux metadata: {e!r}") from e
    return metadata


def _array_keys(name: str, info: TensorInfo) -> list[str]:
    if info.kind == "dense":
        return [f"{name}:dense"]
    keys = [f"{name}:lines"] if info.kind in STRUCTURED_AXES else [f"{name}:counts", f"{name}:offsets"]
    keys.append(f"{name}:values")
    if info.value_dtype == "int8":
        keys.append(f"{name}:scales")
    return keys


def _check_info(path: Path, name: str, info: TensorInfo, header: dict) -> None:
    """Check one tensor's metadata against the shapes and dtypes of its stored arrays."""
    where = f"{path.name!r}: tensor {name!r}"
    if info.kind not in KINDS:
        raise DeltaFormatError(f"{where} has unknown kind {info.kind!r}; this deltamux reads {', '.join(KINDS)}")
    if info.kind != "dense" and info.value_dtype not in _STORED_VALUE_DTYPES:
        raise DeltaFormatError(f"{where} has unknown value dtype {info.value_dtype!r}")
    if info.kind in STRUCTURED_AXES and len(info.shape) != 2:
        raise DeltaFormatError(f"{where} is of kind {info.kind!r} but has shape {info.shape}; it must be 2-D")
    if any(s < 0 for s in info.shape) or not (0 <= info.nnz <= info.numel):
        raise DeltaFormatError(f"{where} has nnz {info.nnz} for shape {info.shape}")
    if not (math.isfinite(info.scale) and info.scale > 0):
        raise DeltaFormatError(f"{where} has invalid scale {info.scale!r}")
    for key in _array_keys(name, info):
        if key not in header:
            raise DeltaFormatError(f"{where} is missing its array {key!r}")

    if info.kind == "dense":
        spec = header[f"{name}:dense"]
        if spec["dtype"] != "F32" or tuple(spec["shape"]) != info.shape:
            raise DeltaFormatError(f"{where} stores a dense array of {spec['dtype']} {spec['shape']}, expected F32 {list(info.shape)}")
        return

    value_dtype = _STORED_VALUE_DTYPES[info.value_dtype]
    if info.kind in STRUCTURED_AXES:
        lines_shape = header[f"{name}:lines"]["shape"]
        lines = lines_shape[0] if len(lines_shape) == 1 else -1
        values_shape = list(structured_values_shape(info.shape, STRUCTURED_AXES[info.kind], lines))
        expected = {f"{name}:lines": ("I32", [lines]), f"{name}:values": (value_dtype, values_shape)}
        if lines < 0 or lines > info.shape[STRUCTURED_AXES[info.kind]] or math.prod(values_shape) != info.nnz:
            raise DeltaFormatError(f"{where} keeps {lines_shape} lines, which does not fit nnz {info.nnz} and shape {info.shape}")
    else:
        blocks = max(1, -(-info.numel // BLOCK_SIZE))
        expected = {
            f"{name}:counts": ("I32", [blocks]),
            f"{name}:offsets": ("I16", [info.nnz]),
            f"{name}:values": (value_dtype, [info.nnz]),
        }
    if info.value_dtype == "int8":
        expected[f"{name}:scales"] = ("F32", [-(-info.nnz // INT8_BLOCK)])
    for key, (dtype_name, shape) in expected.items():
        if header[key]["dtype"] != dtype_name or header[key]["shape"] != shape:
            raise DeltaFormatError(
                f"{where}: array {key!r} is {header[key]['dtype']} {header[key]['shape']}, expected {dtype_name} {shape}"
            )


def _decode_entry(path: Path, name: str, info: TensorInfo, arrays: Mapping[str, torch.Tensor]) -> Entry:
    where = f"{path.name!r}: tensor {name!r}"
    if info.kind == "dense":
        values = arrays[f"{name}:dense"]
        if not bool(torch.isfinite(values).all()):
            raise DeltaFormatError(f"{where} contains NaN or infinite values")
        return DenseEntry(shape=info.shape, values=values)
    if info.kind in STRUCTURED_AXES:
        return _decode_structured(where, name, info, arrays)

    counts = arrays[f"{name}:counts"].to(torch.int64)
    if bool((counts < 0).any()) or int(counts.sum()) != info.nnz:
        raise DeltaFormatError(f"{where} has block counts that do not add up to its nnz {info.nnz}")
    offsets = arrays[f"{name}:offsets"].to(torch.int64) & 0xFFFF
    block_starts = torch.arange(counts.numel(), dtype=torch.int64) * BLOCK_SIZE
    indices = torch.repeat_interleave(block_starts, counts) + offsets
    if indices.numel():
        if int(indices.max()) >= info.numel:
            raise DeltaFormatError(f"{where} has an index {int(indices.max())} outside its {info.numel} elements")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise DeltaFormatError(f"{where} has unsorted or repeated indices")
    values = _decode_values(where, name, info, arrays)
    return SparseEntry(shape=info.shape, indices=indices, values=values)


def _decode_structured(where: str, name: str, info: TensorInfo, arrays: Mapping[str, torch.Tensor]) -> StructuredEntry:
    axis = STRUCTURED_AXES[info.kind]
    lines = arrays[f"{name}:lines"].to(torch.int64)
    if lines.numel():
        if int(lines.min()) < 0 or int(lines.max()) >= info.shape[axis]:
            raise DeltaFormatError(f"{where} keeps a line outside [0, {info.shape[axis]})")
        if lines.numel() > 1 and not bool((lines[1:] > lines[:-1]).all()):
            raise DeltaFormatError(f"{where} has unsorted or repeated line numbers")
    values = _decode_values(where, name, info, arrays)
    return StructuredEntry(shape=info.shape, axis=axis, indices=lines, values=values)


def _decode_values(where: str, name: str, info: TensorInfo, arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Return a tensor's stored values as float32, in their stored shape."""
    stored = arrays[f"{name}:values"]
    if info.value_dtype == "int8":
        scales = arrays[f"{name}:scales"]
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise DeltaFormatError(f"{where} has NaN, infinite or negative int8 scales")
        per_value = torch.repeat_interleave(scales, INT8_BLOCK)[: stored.numel()]
        return (stored.to(torch.float32).reshape(-1) * per_value).view(stored.shape)
    # Decode in float32: the scale is a power of two, so the product is exact.
    values = stored.to(torch.float32) * info.scale
    if not bool(torch.isfinite(values).all()):
        raise DeltaFormatError(f"{where} contains NaN or infinite values")
    return values
