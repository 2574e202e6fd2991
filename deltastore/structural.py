"""Structural delta pruning: keep or drop whole rows or whole columns of a 2-D delta.

Structural DPP (Deng et al., ICLR 2025, "DARE the Extreme", arXiv 2410.09344) applies the
DARE / DAREx-q rescale to whole lines of a delta instead of single entries. The result stores as
dense lines plus their numbers (`format.StructuredEntry`) and applies as dense row (or column)
updates. Rows of a linear weight are output features, columns are input features.

How each pruning method picks lines is data in `LINE_RANKINGS`. `dare` and `darex-q` keep each
line with probability 1 - drop_rate and divide it by q. `magnitude` keeps the lines of largest L2
norm, and `wanda` the lines of largest L2 norm of `delta_ij * ||X_j||_2`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deltastore.format import STRUCTURED_AXES, StructuredEntry
from deltastore.methods import (
    PruneOptions,
    PruningParameterError,
    keep_count,
    mask_generator,
    validate_drop_rate,
    validate_q,
)

STRUCTURES = tuple(STRUCTURED_AXES)

LineScore = Callable[[torch.Tensor, int, PruneOptions, str], torch.Tensor]


@dataclass(frozen=True)
class LineRanking:
    """A pruning method's rule for choosing whole lines: at random (score None) or by a per-line score."""

    method: str
    score: LineScore | None
    description: str


def _norm_scores(delta: torch.Tensor, axis: int, options: PruneOptions, name: str) -> torch.Tensor:
    return delta.norm(dim=1 - axis)  # (lines,)


def _wanda_scores(delta: torch.Tensor, axis: int, options: PruneOptions, name: str) -> torch.Tensor:
    if options.input_norms is None:
        raise PruningParameterError(f"wanda needs the input feature norms of {name!r}: pass calibration text")
    norms = options.input_norms.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    if norms.numel() != delta.shape[1]:
        raise PruningParameterError(
            f"input norms of {name!r} have {norms.numel()} entries but the weight has "
            f"{delta.shape[1]} input features (shape {tuple(delta.shape)})"
        )
    return (delta * norms).norm(dim=1 - axis)  # (lines,)


LINE_RANKINGS: dict[str, LineRanking] = {
    ranking.method: ranking
    for ranking in (
        LineRanking("dare", None, "random lines, rescaled by 1 / (1 - drop rate)"),
        LineRanking("darex-q", None, "random lines, rescaled by 1 / q"),
        LineRanking("magnitude", _norm_scores, "lines of largest L2 norm"),
        LineRanking("wanda", _wanda_scores, "lines of largest L2 norm of |delta| times the input feature norms"),
    )
}


def validate_structure(structure: str) -> str:
    """Return `structure` if it is 'rows' or 'columns', else raise."""
    if structure not in STRUCTURED_AXES:
        raise PruningParameterError(f"invalid structure {structure!r}; choose one of {', '.join(STRUCTURES)}")
    return structure


def random_line_mask(lines: int, *, drop_rate: float, seed: int, name: str, structure: str) -> torch.Tensor:
    """Return the Bernoulli keep mask (True = kept) over the lines of one tensor."""
    # Seeded from a different key than the entry mask of the same tensor, so the two masks are independent.
    generator = mask_generator(seed, f"{name}:{structure}")
    return torch.rand(lines, generator=generator, dtype=torch.float32) >= drop_rate


def prune_lines(delta: torch.Tensor, *, method: str, name: str, options: PruneOptions) -> StructuredEntry:
    """Prune whole rows or columns (`options.structure`) of one 2-D delta with `method`'s ranking."""
    structure = validate_structure(options.structure)
    axis = STRUCTURED_AXES[structure]
    drop_rate = validate_drop_rate(options.drop_rate)
    if method not in LINE_RANKINGS:
        known = ", ".join(sorted(LINE_RANKINGS))
        raise PruningParameterError(f"method {method!r} has no structural form; choose one of: {known}")
    ranking = LINE_RANKINGS[method]
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"delta must be a torch.Tensor, got {type(delta).__name__}")
    # Pruning math runs in float32: half-precision products lose the small deltas.
    delta = delta.detach().to(device="cpu", dtype=torch.float32)
    if delta.dim() != 2:
        raise PruningParameterError(
            f"structural pruning keeps whole rows or columns of 2-D weights, but {name!r} has shape "
            f"{tuple(delta.shape)}; exclude it or prune it without a structure"
        )
    lines = delta.shape[axis]

    # 1. Choose the kept lines and the rescale.
    if ranking.score is None:
        q = 1.0 - drop_rate if method == "dare" else options.q
        if q is None:
            raise PruningParameterError(f"darex-q needs q for tensor {name!r}: pass q in [{1.0 - drop_rate:g}, 1] or select it")
        q = validate_q(q, drop_rate)
        keep = random_line_mask(lines, drop_rate=drop_rate, seed=options.seed, name=name, structure=structure)
        scale = 1.0 / q
    else:
        count = keep_count(lines, drop_rate)
        keep = torch.zeros(lines, dtype=torch.bool)
        if count:
            keep[torch.topk(ranking.score(delta, axis, options, name), count, sorted=False).indices] = True
        scale = 1.0 / (1.0 - drop_rate) if options.rescale else 1.0

    # 2. Lines whose delta is all zero change nothing, so they are never stored.
    if delta.numel():
        keep &= delta.abs().amax(dim=1 - axis) > 0
    indices = torch.nonzero(keep, as_tuple=False).reshape(-1)  # sorted, int64
    values = delta.index_select(axis, indices)  # (lines kept, in) or (out, lines kept)
    if scale != 1.0:
        values = values * scale
    return StructuredEntry(shape=tuple(delta.shape), axis=axis, indices=indices, values=values.contiguous())
