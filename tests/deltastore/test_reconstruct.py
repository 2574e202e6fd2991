"""reconstruct.add_entry: base + delta as a new tensor, equal to an in-place apply for every kind."""

from __future__ import annotations

import pytest
import torch

from deltastore.format import DeltaFormatError, DenseEntry, SparseEntry, StructuredEntry
from deltastore.reconstruct import add_entry

WEIGHT = torch.randn(7, 11, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_entry_rows_updates_whole_rows(dtype: torch.dtype) -> None:
    weight = WEIGHT.to(dtype)
    entry = StructuredEntry(shape=(7, 11), axis=0, indices=torch.tensor([1, 5]), values=torch.full((2, 11), 0.5))

    result = add_entry(weight, entry)

    expected = weight.float().clone()
    expected[[1, 5]] += 0.5
    assert torch.equal(result, expected.to(dtype))
    assert torch.equal(weight, WEIGHT.to(dtype))


def test_add_entry_columns_updates_whole_columns() -> None:
    entry = StructuredEntry(shape=(7, 11), axis=1, indices=torch.tensor([0, 10]), values=torch.ones(7, 2))

    result = add_entry(WEIGHT, entry)

    assert torch.equal(result[:, [0, 10]], WEIGHT[:, [0, 10]] + 1)
    assert torch.equal(result[:, 1:10], WEIGHT[:, 1:10])


def test_add_entry_sparse_and_dense() -> None:
    sparse = SparseEntry(shape=(7, 11), indices=torch.tensor([0, 76]), values=torch.tensor([1.0, -1.0]))
    dense = DenseEntry(shape=(7, 11), values=torch.full((7, 11), 0.25))

    assert add_entry(WEIGHT, sparse).view(-1)[76] == WEIGHT.view(-1)[76] - 1
    assert torch.equal(add_entry(WEIGHT, dense), WEIGHT + 0.25)


def test_add_entry_shape_mismatch_is_rejected() -> None:
    entry = SparseEntry(shape=(11, 7), indices=torch.tensor([0]), values=torch.tensor([1.0]))
    with pytest.raises(DeltaFormatError, match=r"\(11, 7\).*\(7, 11\)"):
        add_entry(WEIGHT, entry)
