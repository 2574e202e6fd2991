"""Apply a delta onto live model weights in place, and restore the base exactly.

The server calls these on the resident model for every task switch, so they work on the
parameter tensors themselves, on whatever device they live, in float32, bfloat16 or float16:

- `decode` turns a delta file into device-ready index and value tensors once;
- `apply` saves the base values at the delta's positions, then writes `base + delta` computed in
  float32 and rounded once to the weight's dtype;
- `restore` writes the saved values back, so the base is bit-identical afterwards in every dtype.

Structurally pruned tensors (whole rows or columns) are applied as dense line updates with
`index_select` / `index_copy_` along their axis, so a kept row is one contiguous write.

When the weights live in one contiguous buffer (`pack_parameters`), the flat sparse tensors of a
delta are applied together: their positions are turned into buffer positions once per decoded
delta, and one `index_select` / `index_copy_` pair serves all of them. A model has hundreds of
weight tensors, and at drop rates near 0.999 the per-tensor calls cost more than moving the data.

The `subtract` mode adds the delta in the weight's dtype and later subtracts it. It needs no
saved copy but drifts in half precision, because `(w + d) - d` is rounded twice; it is kept as
a baseline for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from deltastore.format import DeltaFile, DeltaFormatError, DeltaMetadata, DenseEntry, Entry, StructuredEntry

APPLY_MODES = ("exact", "subtract")


@dataclass
class DecodedTensor:
    """One delta tensor ready for a device: positions (None when dense) and float32 values.

    With `axis` None, `indices` are flat positions. With `axis` 0 or 1, they are the kept row or
    column numbers and `values` holds those whole lines, shaped (lines, in) or (out, lines).
    """

    name: str
    indices: torch.Tensor | None  # (nnz,) int64, or None for a dense delta
    values: torch.Tensor  # (nnz,) float32, or the full shape when dense
    axis: int | None = None

    @property
    def nbytes(self) -> int:
        index_bytes = 0 if self.indices is None else self.indices.numel() * self.indices.element_size()
        return index_bytes + self.values.numel() * self.values.element_size()


@dataclass
class DecodedDelta:
    """A task's whole delta, decoded onto one device."""

    task: str
    tensors: list[DecodedTensor]
    device: torch.device
    nnz: int = 0
    # Buffer positions of the flat sparse tensors, built on first use per packed buffer (see apply).
    merged: dict[int, _Merged] = field(default_factory=dict, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        merged = sum(m.positions.numel() * 8 + m.values.numel() * 4 for m in self.merged.values())
        return sum(t.nbytes for t in self.tensors) + merged


@dataclass(frozen=True)
class _Merged:
    """The flat sparse tensors of one delta that live in one packed buffer, as buffer positions."""

    members: frozenset[int]  # positions in DecodedDelta.tensors
    offsets: tuple[int, ...]  # each member's storage offset when built; a cached copy must match
    positions: torch.Tensor  # (nnz,) int64, into the buffer
    values: torch.Tensor  # (nnz,) float32


@dataclass
class AppliedDelta:
    """The record `restore` needs to undo one `apply`: the mode and the saved base values."""

    task: str
    mode: str
    decoded: DecodedDelta
    saved: list[torch.Tensor | None] = field(default_factory=list)  # one per decoded tensor
    restored: bool = False
    # Tensors applied through a packed buffer: (buffer, merged positions, saved values or None).
    merged: list[tuple[torch.Tensor, _Merged, torch.Tensor | None]] = field(default_factory=list)


def model_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map checkpoint tensor names to the model's parameter tensors, tied weights listed once."""
    params: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, param in model.state_dict(keep_vars=True).items():
        key = param.data_ptr()
        if key in seen:
            continue  # a tied weight (for example lm_head sharing the input embedding)
        seen.add(key)
        params[name] = param
    return params


@torch.no_grad()
def pack_parameters(params: Mapping[str, torch.Tensor]) -> int:
    """Move the tensors into one contiguous buffer per dtype and device, each becoming a view of it.

    Returns the number of buffers. Values, shapes and tensor objects stay the same, so a model
    that owns these parameters works as before. `apply` then reaches every flat sparse tensor of
    a delta with one indexing call.
    """
    # NOTE: the old tensors and the new buffer exist together while packing, so memory peaks at
    # twice the packed bytes. On a GPU with little free memory, pack before other allocations.
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in params.values():
        if not tensor.is_contiguous():
            raise ValueError("pack_parameters needs contiguous tensors; a non-contiguous one cannot become a flat view")
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for (dtype, device), tensors in groups.items():
        buffer = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
        offset = 0
        for tensor in tensors:
            numel = tensor.numel()
            buffer[offset : offset + numel].copy_(tensor.reshape(-1))
            tensor.set_(buffer.untyped_storage(), offset, tensor.shape, tensor.stride())
            offset += numel
    return len(groups)


def _buffer_of(weight: torch.Tensor) -> torch.Tensor:
    """Return the whole 1-D storage that `weight` is a view of, in its dtype."""
    storage = weight.untyped_storage()
    return weight.new_empty(0).set_(storage, 0, (storage.nbytes() // weight.element_size(),))


def _merged_group(decoded: DecodedDelta, targets: list[torch.Tensor]) -> _Merged | None:
    """Return the delta's flat sparse tensors that share one packed buffer, as buffer positions.

    Only a buffer that contains at least two of them is merged; otherwise None.
    """
    by_storage: dict[int, list[int]] = {}
    for i, (tensor, weight) in enumerate(zip(decoded.tensors, targets)):
        if tensor.indices is not None and tensor.axis is None:
            by_storage.setdefault(weight.untyped_storage().data_ptr(), []).append(i)
    if not by_storage:
        return None
    key, members = max(by_storage.items(), key=lambda item: len(item[1]))
    if len(members) < 2:
        return None
    offsets = tuple(targets[i].storage_offset() for i in members)
    cached = decoded.merged.get(key)
    if cached is not None and cached.members == frozenset(members) and cached.offsets == offsets:
        return cached
    positions = torch.cat([decoded.tensors[i].indices + offset for i, offset in zip(members, offsets)])
    values = torch.cat([decoded.tensors[i].values for i in members])
    merged = _Merged(members=frozenset(members), offsets=offsets, positions=positions, values=values)
    decoded.merged[key] = merged
    return merged


def prepare_merged(params: Mapping[str, torch.Tensor], decoded: DecodedDelta) -> None:
    """Build the packed-buffer positions that `apply` uses now, so `decoded.nbytes` counts them."""
    _merged_group(decoded, [_target(params, tensor, decoded) for tensor in decoded.tensors])


def check_compatible(metadata: DeltaMetadata, params: Mapping[str, torch.Tensor]) -> None:
    """Raise DeltaFormatError unless every delta tensor names a parameter of the same shape."""
    missing = sorted(name for name in metadata.tensors if name not in params)
    if missing:
        raise DeltaFormatError(
            f"delta {metadata.task!r} names tensors the model does not have: {missing[:5]!r}"
            f"{' and more' if len(missing) > 5 else ''}; it was made for another architecture"
        )
    for name, info in metadata.tensors.items():
        shape = tuple(params[name].shape)
        if shape != info.shape:
            raise DeltaFormatError(
                f"delta {metadata.task!r}: tensor {name!r} has shape {info.shape} but the model's has {shape}"
            )


def decode(delta: DeltaFile, *, device: torch.device | str = "cpu") -> DecodedDelta:
    """Move a delta file's entries onto `device` as index and float32 value tensors."""
    device = torch.device(device)
    tensors = [decode_entry(name, delta.entries[name], device=device) for name in sorted(delta.entries)]
    return DecodedDelta(task=delta.metadata.task, tensors=tensors, device=device, nnz=delta.metadata.nnz)


def decode_entry(name: str, entry: Entry, *, device: torch.device | str = "cpu") -> DecodedTensor:
    """Move one entry onto `device` as index and float32 value tensors."""
    values = entry.values.to(device=device, dtype=torch.float32)
    if isinstance(entry, DenseEntry):
        return DecodedTensor(name=name, indices=None, values=values.reshape(entry.shape))
    indices = entry.indices.to(device=device, dtype=torch.int64)
    axis = entry.axis if isinstance(entry, StructuredEntry) else None
    return DecodedTensor(name=name, indices=indices, values=values, axis=axis)


@torch.no_grad()
def apply(params: Mapping[str, torch.Tensor], decoded: DecodedDelta, *, mode: str = "exact") -> AppliedDelta:
    """Add `decoded` onto `params` in place and return the record that `restore` needs."""
    if mode not in APPLY_MODES:
        raise ValueError(f"invalid apply mode {mode!r}; choose one of {APPLY_MODES}")
    targets = [_target(params, tensor, decoded) for tensor in decoded.tensors]
    applied = AppliedDelta(task=decoded.task, mode=mode, decoded=decoded)

    # 1. Flat sparse tensors in one packed buffer: one gather and one scatter for all of them.
    merged = _merged_group(decoded, targets)
    if merged is not None:
        buffer = _buffer_of(targets[min(merged.members)])
        if mode == "exact":
            saved = buffer.index_select(0, merged.positions)
            # Sum in float32 and round once, exactly as the per-tensor path below does.
            buffer.index_copy_(0, merged.positions, (saved.float() + merged.values).to(buffer.dtype))
            applied.merged.append((buffer, merged, saved))
        else:
            buffer.index_add_(0, merged.positions, merged.values.to(buffer.dtype))
            applied.merged.append((buffer, merged, None))
    skip = merged.members if merged is not None else frozenset()

    # 2. Every other tensor on its own.
    for i, (tensor, weight) in enumerate(zip(decoded.tensors, targets)):
        if i in skip:
            applied.saved.append(None)
            continue
        if tensor.indices is None:
            if mode == "exact":
                saved = weight.clone()
                # Sum in float32 and round once, so the result does not depend on the weight dtype's rounding twice.
                weight.copy_((saved.float() + tensor.values).to(weight.dtype))
                applied.saved.append(saved)
            else:
                weight.add_(tensor.values.to(weight.dtype))
                applied.saved.append(None)
            continue

        if tensor.axis is not None:
            applied.saved.append(_apply_lines(weight, tensor, mode))
            continue

        flat = weight.view(-1)
        if mode == "exact":
            saved = flat.index_select(0, tensor.indices)
            # Sum in float32 and round once; `saved` keeps the exact base bits for restore.
            flat.index_copy_(0, tensor.indices, (saved.float() + tensor.values).to(weight.dtype))
            applied.saved.append(saved)
        else:
            flat.index_add_(0, tensor.indices, tensor.values.to(weight.dtype))
            applied.saved.append(None)
    return applied


@torch.no_grad()
def restore(params: Mapping[str, torch.Tensor], applied: AppliedDelta) -> None:
    """Undo one `apply`; in exact mode the weights are bit-identical to the base afterwards."""
    if applied.restored:
        raise RuntimeError(f"delta {applied.task!r} was already restored; restoring twice would corrupt the base")
    skip: frozenset[int] = frozenset()
    for buffer, merged, saved in applied.merged:
        skip |= merged.members
        if applied.mode == "exact":
            buffer.index_copy_(0, merged.positions, saved)
        else:
            buffer.index_add_(0, merged.positions, merged.values.to(buffer.dtype), alpha=-1)
    for i, (tensor, saved) in enumerate(zip(applied.decoded.tensors, applied.saved)):
        if i in skip:
            continue
        weight = params[tensor.name].data
        if tensor.axis is not None:
            if applied.mode == "exact":
                weight.index_copy_(tensor.axis, tensor.indices, saved)
            else:
                weight.index_add_(tensor.axis, tensor.indices, tensor.values.to(weight.dtype), alpha=-1)
        elif applied.mode == "exact":
            if tensor.indices is None:
                weight.copy_(saved)
            else:
                weight.view(-1).index_copy_(0, tensor.indices, saved)
        elif tensor.indices is None:
            weight.sub_(tensor.values.to(weight.dtype))
        else:
            weight.view(-1).index_add_(0, tensor.indices, tensor.values.to(weight.dtype), alpha=-1)
    applied.restored = True


def _apply_lines(weight: torch.Tensor, tensor: DecodedTensor, mode: str) -> torch.Tensor | None:
    """Add whole rows or columns of a structured delta; return the saved base lines in exact mode."""
    if mode == "exact":
        saved = weight.index_select(tensor.axis, tensor.indices)  # (lines, in) or (out, lines)
        # Sum in float32 and round once, as for flat positions.
        weight.index_copy_(tensor.axis, tensor.indices, (saved.float() + tensor.values).to(weight.dtype))
        return saved
    weight.index_add_(tensor.axis, tensor.indices, tensor.values.to(weight.dtype))
    return None


def _target(params: Mapping[str, torch.Tensor], tensor: DecodedTensor, decoded: DecodedDelta) -> torch.Tensor:
    if tensor.name not in params:
        raise DeltaFormatError(f"delta {decoded.task!r} names tensor {tensor.name!r}, which the model does not have")
    weight = params[tensor.name].data
    if not weight.is_contiguous():
        raise ValueError(f"parameter {tensor.name!r} is not contiguous; flat indices need a contiguous tensor")
    if weight.device != tensor.values.device:
        raise ValueError(
            f"delta {decoded.task!r} is decoded on {tensor.values.device} but {tensor.name!r} lives on {weight.device}; "
            "decode it for the model's device"
        )
    if tensor.indices is None and tuple(weight.shape) != tuple(tensor.values.shape):
        raise DeltaFormatError(f"delta {decoded.task!r}: dense tensor {tensor.name!r} has shape {tuple(tensor.values.shape)}, the model's {tuple(weight.shape)}")
    if tensor.axis is not None:
        lines = tensor.indices.numel()
        expected = (lines, weight.shape[1]) if tensor.axis == 0 else (weight.shape[0], lines)
        if weight.dim() != 2 or tuple(tensor.values.shape) != expected:
            raise DeltaFormatError(
                f"delta {decoded.task!r}: tensor {tensor.name!r} keeps lines of shape {tuple(tensor.values.shape)} "
                f"along axis {tensor.axis}, which does not fit the model's shape {tuple(weight.shape)}"
            )
    return weight
