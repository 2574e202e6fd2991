"""Mixed-task batches: rows of several tasks generated together on the base weights.

A delta merged into the resident weights serves one task per batch. When requests for many tasks
wait at once, those batches stay small and the batching gain of the hardware is lost. In a mixed
batch the resident weights are the base's, and forward hooks add each row's own delta to the
output of every module its task changed:

- a linear layer's weight: `y[rows] += x[rows] @ delta.T`, a CSR sparse product for flat sparse
  deltas, a dense product over the kept lines of a structured (rows or columns) delta;
- a linear layer's bias: `y[rows] += delta`;
- an RMSNorm or LayerNorm weight: `y[rows] += delta * normalized(x[rows])`, the normalization
  computed again in the hook, because the output cannot be divided by a weight that may be 0.

A delta that changes any other tensor (an embedding, a tied LM head, a norm's bias) cannot be
mixed. `prepare` raises `NotMixable` for it, and the engine serves that task in batches of its own.

Exactness: a mixed row computes `W x + D x` where a merged batch computes `(W + D) x`, so their
outputs agree up to floating-point rounding, not bit for bit. Batches of a single task still run
on merged weights and match a merged checkpoint exactly.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deltastore.apply import DecodedDelta, DecodedTensor

logger = logging.getLogger(__name__)


class NotMixable(ValueError):
    """A delta changes a tensor that per-row hooks cannot add, so its task runs in its own batches."""


@dataclass(frozen=True)
class _WeightTerm:
    """A linear layer's weight delta as a product on the layer's input."""

    sparse: torch.Tensor | None = None  # CSR (out, in), float32
    lines: torch.Tensor | None = None  # kept lines: (lines, in) for axis 0, (out, lines) for axis 1
    line_indices: torch.Tensor | None = None
    axis: int | None = None
    dense: torch.Tensor | None = None  # (out, in), float32
    out_features: int = 0

    def extra(self, x: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
        """Return `x @ delta.T` in float32 for rows x (..., in), shaped `out_shape`."""
        flat = x.reshape(-1, x.shape[-1]).float()
        if self.sparse is not None:
            extra = (self.sparse @ flat.T.contiguous()).T  # a contiguous dense operand is the fast CSR path
        elif self.dense is not None:
            extra = flat @ self.dense.T
        elif self.axis == 0:
            extra = flat.new_zeros((flat.shape[0], self.out_features))
            extra.index_copy_(1, self.line_indices, flat @ self.lines.T)
        else:
            extra = flat.index_select(1, self.line_indices) @ self.lines.T
        return extra.reshape(out_shape)

    @property
    def nbytes(self) -> int:
        tensors = [self.lines, self.line_indices, self.dense]
        if self.sparse is not None:
            tensors += [self.sparse.crow_indices(), self.sparse.col_indices(), self.sparse.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class _BiasTerm:
    delta: torch.Tensor  # (out,), float32

    def extra(self, x: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
        return self.delta.expand(out_shape)

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size()


@dataclass(frozen=True)
class _NormWeightTerm:
    """An RMSNorm or LayerNorm weight delta: the module's normalization of x, scaled by the delta."""

    delta: torch.Tensor  # (hidden,), float32
    kind: str  # "rms" or "layer"
    eps: float

    def extra(self, x: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
        return self.delta * _normalized(x, kind=self.kind, eps=self.eps)

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size()


def _normalized(x: torch.Tensor, *, kind: str, eps: float) -> torch.Tensor:
    """Return a norm module's output before its weight: x normalized in float32."""
    hidden = x.float()
    if kind == "rms":
        normalized = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    else:
        normalized = F.layer_norm(hidden, hidden.shape[-1:], eps=eps)
    # The norm rounds the normalized input to the input dtype before the weight multiplies it.
    return normalized.to(x.dtype).float()


_Term = _WeightTerm | _BiasTerm | _NormWeightTerm


@dataclass
class RowDelta:
    """One task's delta prepared for mixed batches: the terms to add, by module name."""

    task: str
    terms: dict[str, list[_Term]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(term.nbytes for terms in self.terms.values() for term in terms)


def prepare(model: nn.Module, decoded: DecodedDelta) -> RowDelta:
    """Turn a decoded delta into per-module terms; raise NotMixable for a tensor no hook can add."""
    prepared = RowDelta(task=decoded.task)
    owners: dict[int, int] = {}  # parameter id -> number of modules that hold it (2 when tied)
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    for tensor in decoded.tensors:
        module_name, _, attribute = tensor.name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError as e:
            raise NotMixable(f"delta {decoded.task!r}: tensor {tensor.name!r} names no module of the model") from e
        if owners.get(id(getattr(module, attribute, None)), 0) > 1:
            raise NotMixable(f"delta {decoded.task!r}: tensor {tensor.name!r} is tied to another module")
        prepared.terms.setdefault(module_name, []).append(_term(decoded.task, module, attribute, tensor))
    return prepared


def _term(task: str, module: nn.Module, attribute: str, tensor: DecodedTensor) -> _Term:
    if isinstance(module, nn.Linear) and attribute == "weight":
        return _weight_term(module, tensor)
    if isinstance(module, nn.Linear) and attribute == "bias":
        return _BiasTerm(delta=_dense_vector(module.bias, tensor))
    if attribute == "weight" and isinstance(module, nn.LayerNorm):
        return _NormWeightTerm(delta=_dense_vector(module.weight, tensor), kind="layer", eps=module.eps)
    if attribute == "weight" and type(module).__name__.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if isinstance(eps, float):
            return _NormWeightTerm(delta=_dense_vector(module.weight, tensor), kind="rms", eps=eps)
    raise NotMixable(
        f"delta {task!r}: tensor {tensor.name!r} of a {type(module).__name__} cannot be added per row "
        "(mixed batches handle linear weights and biases and norm weights)"
    )


def _weight_term(module: nn.Linear, tensor: DecodedTensor) -> _WeightTerm:
    out_features, in_features = module.weight.shape
    if tensor.indices is None:
        return _WeightTerm(dense=tensor.values, out_features=out_features)
    if tensor.axis is not None:
        return _WeightTerm(lines=tensor.values, line_indices=tensor.indices, axis=tensor.axis, out_features=out_features)

    # Flat positions: build CSR directly (positions sorted, so rows come out in order).
    order = torch.argsort(tensor.indices)
    positions, values = tensor.indices[order], tensor.values[order]
    rows = torch.div(positions, in_features, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=out_features)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with warnings.catch_warnings():
        # torch 2.13 warns that CSR support is in beta on every construction; the product used here is stable.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        sparse = torch.sparse_csr_tensor(
            _index_dtype(crow), _index_dtype(positions - rows * in_features), values,
            size=(out_features, in_features), check_invariants=True,
        )
    return _WeightTerm(sparse=sparse, out_features=out_features)


def _dense_vector(parameter: torch.Tensor | None, tensor: DecodedTensor) -> torch.Tensor:
    if parameter is None:
        raise NotMixable(f"tensor {tensor.name!r} names a parameter the module does not have")
    if tensor.indices is None:
        return tensor.values.reshape(-1)
    dense = tensor.values.new_zeros(parameter.numel())
    if tensor.axis is not None:
        raise NotMixable(f"tensor {tensor.name!r}: a structured delta of a vector cannot be added per row")
    dense.index_copy_(0, tensor.indices, tensor.values)
    return dense


def _add_rows(output: torch.Tensor, positions: torch.Tensor, extra: torch.Tensor) -> None:
    """Add float32 `extra` to `output`'s rows at `positions` in place, rounding once."""
    if output.dtype == torch.float32:
        output.index_add_(0, positions, extra)
    else:
        rows_out = output.index_select(0, positions).float() + extra
        output.index_copy_(0, positions, rows_out.to(output.dtype))


@dataclass(frozen=True)
class _GroupOp:
    """The terms of one task, added to that task's rows one term at a time."""

    positions: torch.Tensor
    terms: tuple[_Term, ...]

    def run(self, x: torch.Tensor, output: torch.Tensor) -> None:
        rows_in = x.index_select(0, self.positions)
        out_shape = (self.positions.numel(), *output.shape[1:])
        extra = self.terms[0].extra(rows_in, out_shape)
        for term in self.terms[1:]:
            extra = extra + term.extra(rows_in, out_shape)
        _add_rows(output, self.positions, extra)


@dataclass(frozen=True)
class _StackedSparseOp:
    """The sparse weight deltas of several tasks as one block-diagonal CSR product.

    Each task's rows are copied into its own block of a zero-padded input (`slots` gives where),
    so a single sparse product serves every task instead of one small product per task.
    """

    positions: torch.Tensor  # batch rows of every task, (n,)
    slots: torch.Tensor  # each of those rows' slot in the padded layout of blocks x width, (n,)
    blocks: int
    width: int
    matrix: torch.Tensor  # CSR (blocks * out, blocks * in), float32
    out_features: int

    def run(self, x: torch.Tensor, output: torch.Tensor) -> None:
        rows_in = x.index_select(0, self.positions).float()  # (n, *middle, in)
        middle, in_features = rows_in.shape[1:-1], rows_in.shape[-1]
        tokens = rows_in[0, ..., 0].numel()  # positions per row (sequence length)
        padded = rows_in.new_zeros((self.blocks * self.width, *middle, in_features))
        padded.index_copy_(0, self.slots, rows_in)
        # (blocks, width * tokens, in) -> (blocks * in, width * tokens): block b's inputs in its column band.
        stacked = padded.view(self.blocks, self.width * tokens, in_features).transpose(1, 2)
        product = self.matrix @ stacked.reshape(self.blocks * in_features, self.width * tokens)
        per_slot = product.view(self.blocks, self.out_features, self.width, tokens).permute(0, 2, 3, 1)
        per_slot = per_slot.reshape(self.blocks * self.width, *middle, self.out_features)
        _add_rows(output, self.positions, per_slot.index_select(0, self.slots))


@dataclass(frozen=True)
class _StackedVectorOp:
    """Bias or norm-weight deltas of several tasks, each row's delta gathered beside it."""

    positions: torch.Tensor  # (n,)
    deltas: torch.Tensor  # (n, features): the delta of each row's task
    term: _BiasTerm | _NormWeightTerm  # one of the stacked terms, for its kind and eps

    def run(self, x: torch.Tensor, output: torch.Tensor) -> None:
        middle = output.shape[1:-1]
        deltas = self.deltas.view(self.deltas.shape[0], *([1] * len(middle)), self.deltas.shape[1])
        if isinstance(self.term, _BiasTerm):
            extra = deltas.expand(self.deltas.shape[0], *middle, self.deltas.shape[1])
        else:
            rows_in = x.index_select(0, self.positions)
            extra = deltas * _normalized(rows_in, kind=self.term.kind, eps=self.term.eps)
        _add_rows(output, self.positions, extra.contiguous())


_Op = _GroupOp | _StackedSparseOp | _StackedVectorOp


def _block_diagonal(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack CSR matrices of one shape (out, in) into a block-diagonal CSR matrix."""
    out_features, in_features = matrices[0].shape
    crows, columns, values = [], [], []
    offset = 0
    for block, matrix in enumerate(matrices):
        crow = matrix.crow_indices().long()  # offsets are added in int64, then narrowed if they fit
        crows.append(crow[:-1] + offset)
        columns.append(matrix.col_indices().long() + block * in_features)
        values.append(matrix.values())
        offset += int(crow[-1])
    crows.append(crows[0].new_tensor([offset]))
    size = (len(matrices) * out_features, len(matrices) * in_features)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # The blocks were checked when each was built, so the stack needs no second check.
        return torch.sparse_csr_tensor(
            _index_dtype(torch.cat(crows)), _index_dtype(torch.cat(columns)), torch.cat(values), size=size,
            check_invariants=False,
        )


def _index_dtype(indices: torch.Tensor) -> torch.Tensor:
    """Return CSR indices as int32 when they fit (a CPU sparse product of 70k nonzeros took 72 us instead of 88 us, torch 2.13)."""
    if indices.numel() and int(indices.max()) >= 2**31:
        return indices.to(torch.int64)
    return indices.to(torch.int32)


class MixedBatch:
    """Forward hooks that add each row's delta while one mixed batch runs; use as a context manager.

    `row_deltas[i]` is the delta of the batch's sequence i, or None for a base row. Before each
    forward pass, `set_active` gives the sequence index of every current batch row, because
    finished rows leave the batch. It plans, per module, the operations for that set of rows.
    Sparse weight deltas and bias or norm deltas of several tasks are stacked, so one product
    serves every task. Other terms run task by task.
    """

    def __init__(self, model: nn.Module, row_deltas: Sequence[RowDelta | None]) -> None:
        self.model = model
        self.row_deltas = list(row_deltas)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._ops: dict[str, list[_Op]] = {}
        self._block_diagonals: dict[tuple[int, ...], torch.Tensor] = {}  # by the stacked terms' ids
        self._device = next(model.parameters()).device

    def __enter__(self) -> MixedBatch:
        names = sorted({name for delta in self.row_deltas if delta is not None for name in delta.terms})
        for name in names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        self.set_active(list(range(len(self.row_deltas))))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._ops.clear()
        self._block_diagonals.clear()

    def set_active(self, sequence_indices: Sequence[int]) -> None:
        """Plan each module's operations for the current batch rows."""
        # 1. Batch rows by delta, in order of first appearance.
        rows_by_delta: dict[int, tuple[RowDelta, list[int]]] = {}
        for row, index in enumerate(sequence_indices):
            delta = self.row_deltas[index]
            if delta is not None:
                rows_by_delta.setdefault(id(delta), (delta, []))[1].append(row)
        groups = list(rows_by_delta.values())

        # 2. Per module, stack the terms that stack and keep the rest per task.
        per_module: dict[str, list[tuple[list[int], _Term]]] = {}
        for delta, rows in groups:
            for name, terms in delta.terms.items():
                per_module.setdefault(name, []).extend((rows, term) for term in terms)
        self._ops = {name: self._plan(entries) for name, entries in per_module.items()}

    def _plan(self, entries: list[tuple[list[int], _Term]]) -> list[_Op]:
        sparse = [(rows, term) for rows, term in entries if isinstance(term, _WeightTerm) and term.sparse is not None]
        vectors: dict[tuple, list[tuple[list[int], _Term]]] = {}
        for rows, term in entries:
            if isinstance(term, _BiasTerm):
                vectors.setdefault(("bias",), []).append((rows, term))
            elif isinstance(term, _NormWeightTerm):
                vectors.setdefault((term.kind, term.eps), []).append((rows, term))
        ops: list[_Op] = []
        stacked: set[int] = set()
        if len(sparse) > 1:
            ops.append(self._stack_sparse(sparse))
            stacked.update(id(term) for _, term in sparse)
        for same_kind in vectors.values():
            if len(same_kind) > 1:
                ops.append(self._stack_vectors(same_kind))
                stacked.update(id(term) for _, term in same_kind)
        for rows, term in entries:
            if id(term) not in stacked:
                ops.append(_GroupOp(positions=self._tensor(rows), terms=(term,)))
        return ops

    def _stack_sparse(self, sparse: list[tuple[list[int], _WeightTerm]]) -> _StackedSparseOp:
        key = tuple(id(term) for _, term in sparse)
        matrix = self._block_diagonals.get(key)
        if matrix is None:
            matrix = _block_diagonal([term.sparse for _, term in sparse])
            self._block_diagonals[key] = matrix
        width = max(len(rows) for rows, _ in sparse)
        positions = [row for rows, _ in sparse for row in rows]
        slots = [block * width + j for block, (rows, _) in enumerate(sparse) for j in range(len(rows))]
        return _StackedSparseOp(
            positions=self._tensor(positions), slots=self._tensor(slots), blocks=len(sparse), width=width,
            matrix=matrix, out_features=sparse[0][1].out_features,
        )

    def _stack_vectors(self, same_kind: list[tuple[list[int], _BiasTerm | _NormWeightTerm]]) -> _StackedVectorOp:
        positions = [row for rows, _ in same_kind for row in rows]
        deltas = torch.stack([term.delta for rows, term in same_kind for _ in rows])
        return _StackedVectorOp(positions=self._tensor(positions), deltas=deltas, term=same_kind[0][1])

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self._device)

    def _hook(self, name: str):
        def add_row_deltas(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            ops = self._ops.get(name)
            if not ops:
                return
            x = args[0] if args else next(iter(kwargs.values()))
            # The output is a fresh tensor of this module, so it is updated in place.
            for op in ops:
                op.run(x, output)

        return add_row_deltas
