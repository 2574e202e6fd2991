"""Delta pruning methods: pure tensor functions registered as data.

Each method takes one float32 delta tensor (`finetuned - base`) and returns a `SparseEntry`: the
flat, sorted indices of the kept entries and their float32 values after rescaling. Entries whose
delta is exactly zero are never stored, because dropping them changes nothing.

Sources:
- DARE: Yu et al., 2023, "Language Models are Super Mario" (random drop, rescale by 1/(1-p)).
- DAREx-q: Deng et al., ICLR 2025, "DARE the Extreme" (arXiv 2410.09344): rescale by 1/q instead.
- WANDA: Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models"
  (score |weight| times the input feature norm, keep the top per output row); applied here to the
  delta as in DARE the Extreme.

A new method is a new `PruningMethod` in `METHODS`, not a new branch in the callers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deltastore.format import SparseEntry, StructuredEntry


class PruningParameterError(ValueError):
    """A pruning parameter (drop rate, q, input norms) is out of range or missing."""


@dataclass(frozen=True)
class PruneOptions:
    """Parameters shared by every pruning method; each method reads the ones it lists."""

    drop_rate: float
    seed: int = 0
    # DAREx-q rescale: kept values are divided by q, with q in [1 - drop_rate, 1].
    q: float | None = None
    # Magnitude and WANDA only: rescale kept values by 1 / (1 - drop_rate). Off by default because
    # the kept entries are the large ones, so scaling them up overshoots the full delta.
    rescale: bool = False
    # WANDA only: L2 norm of each input feature over calibration tokens, shape (in_features,).
    input_norms: torch.Tensor | None = None
    # "rows" or "columns" to keep or drop whole lines of a 2-D delta (structural.py); None prunes entries.
    structure: str | None = None


PruneFunction = Callable[..., SparseEntry]
Pruned = SparseEntry | StructuredEntry


@dataclass(frozen=True)
class PruningMethod:
    """One registered method: its function and what it needs from the caller."""

    name: str
    display_name: str
    source: str
    prune: PruneFunction
    # The `PruneOptions` fields this method reads.
    parameters: tuple[str, ...]
    needs_input_norms: bool = False
    needs_q: bool = False
    # Entries the method selects in a tensor of this shape at a drop rate, for methods whose count
    # is fixed by the shape. None for random methods, whose expected drop rate is the one requested.
    selected_count: Callable[[tuple[int, ...], float], int] | None = None


def validate_drop_rate(drop_rate: float) -> float:
    """Return `drop_rate` as a float, or raise unless it lies in [0, 1)."""
    try:
        value = float(drop_rate)
    except (TypeError, ValueError) as e:
        raise PruningParameterError(f"drop rate must be a number in [0, 1), got {drop_rate!r}") from e
    if not 0.0 <= value < 1.0:
        raise PruningParameterError(
            f"drop rate {drop_rate!r} is outside the allowed range [0, 1); "
            "it is the fraction of delta entries set to zero, so 0.99 keeps 1 %"
        )
    return value


def validate_q(q: float, drop_rate: float) -> float:
    """Return `q` as a float, or raise unless it lies in [1 - drop_rate, 1]."""
    low = 1.0 - validate_drop_rate(drop_rate)
    try:
        value = float(q)
    except (TypeError, ValueError) as e:
        raise PruningParameterError(f"q must be a number in [{low:g}, 1], got {q!r}") from e
    # Allow float rounding at the lower end, so q = 1 - p computed by the caller is accepted.
    if not (low - 1e-12 <= value <= 1.0):
        raise PruningParameterError(
            f"q {q!r} is outside the allowed range [1 - drop rate, 1] = [{low:g}, 1] "
            f"for drop rate {drop_rate!r}; q = {low:g} is plain DARE"
        )
    return value


def keep_count(size: int, drop_rate: float) -> int:
    """Return how many of `size` entries a deterministic method keeps at `drop_rate`."""
    # round(), not int(): 1000 * (1 - 0.9) is 99.99999999999997 in float64.
    return min(size, max(0, round(size * (1.0 - drop_rate))))


def magnitude_selected_count(shape: tuple[int, ...], drop_rate: float) -> int:
    """Return how many entries magnitude pruning selects: one count over the whole tensor."""
    return keep_count(math.prod(shape), drop_rate)


def wanda_selected_count(shape: tuple[int, ...], drop_rate: float) -> int:
    """Return how many entries WANDA selects: a count rounded per output row, times the rows.

    The rounding happens per row, so a narrow weight at a high drop rate keeps noticeably more
    than asked: 576 input features at drop rate 0.999 keep round(0.576) = 1 entry per row.
    """
    if len(shape) != 2:
        return keep_count(math.prod(shape), drop_rate)
    rows, columns = shape
    return rows * keep_count(columns, drop_rate)


def effective_drop_rate(method: str, shapes: list[tuple[int, ...]], drop_rate: float) -> float | None:
    """Return the share of entries `method` drops over tensors of `shapes`, or None for random methods.

    Entries whose delta is exactly zero count as selected here, because the method chose them
    before the writer left them out.
    """
    counter = get_method(method).selected_count
    total = sum(math.prod(shape) for shape in shapes)
    if counter is None or total == 0:
        return None
    selected = sum(counter(shape, drop_rate) for shape in shapes)
    return 1.0 - selected / total


def mask_generator(seed: int, name: str) -> torch.Generator:
    """Return a CPU generator seeded from (seed, tensor name).

    Every tensor gets an independent mask, and the same seed and name give the same mask in
    every run and every process (no dependence on Python's salted `hash`).
    """
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little"))


def _as_float32(delta: torch.Tensor) -> torch.Tensor:
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"delta must be a torch.Tensor, got {type(delta).__name__}")
    # Pruning math runs in float32: half-precision products and divisions lose the small deltas.
    return delta.detach().to(device="cpu", dtype=torch.float32)


def _entry_from_mask(delta: torch.Tensor, keep: torch.Tensor, scale: float) -> SparseEntry:
    """Build a SparseEntry of `delta * scale` at the kept, non-zero positions."""
    flat = delta.reshape(-1)
    keep = keep.reshape(-1) & (flat != 0)
    indices = torch.nonzero(keep, as_tuple=False).reshape(-1)  # sorted, int64
    values = flat[indices]
    if scale != 1.0:
        values = values * scale
    return SparseEntry(shape=tuple(delta.shape), indices=indices, values=values.contiguous())


def _entry_from_indices(delta: torch.Tensor, indices: torch.Tensor, scale: float) -> SparseEntry:
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[indices] = True
    return _entry_from_mask(delta, keep, scale)


def random_keep_mask(shape: tuple[int, ...], *, drop_rate: float, seed: int, name: str) -> torch.Tensor:
    """Return the Bernoulli keep mask (True = kept, probability 1 - drop_rate) for one tensor."""
    generator = mask_generator(seed, name)
    # Sampled in float32 because half-precision sampling is not implemented on CPU.
    uniform = torch.rand(shape, generator=generator, dtype=torch.float32)
    return uniform >= drop_rate


def prune_darex_q(delta: torch.Tensor, *, name: str, options: PruneOptions) -> SparseEntry:
    """Drop each entry with probability drop_rate and divide the kept ones by q."""
    drop_rate = validate_drop_rate(options.drop_rate)
    if options.q is None:
        raise PruningParameterError(
            f"darex-q needs q for tensor {name!r}: pass q in [{1.0 - drop_rate:g}, 1] or select it"
        )
    q = validate_q(options.q, drop_rate)
    delta = _as_float32(delta)
    keep = random_keep_mask(tuple(delta.shape), drop_rate=drop_rate, seed=options.seed, name=name)
    return _entry_from_mask(delta, keep, 1.0 / q)


def prune_dare(delta: torch.Tensor, *, name: str, options: PruneOptions) -> SparseEntry:
    """Drop each entry with probability drop_rate and rescale the kept ones by 1 / (1 - drop_rate)."""
    drop_rate = validate_drop_rate(options.drop_rate)
    # DARE is DAREx-q at its lower end, so both share one code path and agree bit for bit.
    dare_options = PruneOptions(drop_rate=drop_rate, seed=options.seed, q=1.0 - drop_rate)
    return prune_darex_q(delta, name=name, options=dare_options)


def _importance_scale(options: PruneOptions, drop_rate: float) -> float:
    return 1.0 / (1.0 - drop_rate) if options.rescale else 1.0


def prune_magnitude(delta: torch.Tensor, *, name: str, options: PruneOptions) -> SparseEntry:
    """Keep the round((1 - drop_rate) * numel) entries of largest |delta|, minus any zero deltas."""
    drop_rate = validate_drop_rate(options.drop_rate)
    delta = _as_float32(delta)
    count = keep_count(delta.numel(), drop_rate)
    if count == 0:
        indices = torch.empty(0, dtype=torch.int64)
    else:
        indices = torch.topk(delta.reshape(-1).abs(), count, sorted=False).indices
    return _entry_from_indices(delta, indices, _importance_scale(options, drop_rate))


def prune_wanda(delta: torch.Tensor, *, name: str, options: PruneOptions) -> SparseEntry:
    """Keep, per output row, the round((1 - drop_rate) * in_features) largest |delta_ij| * ||X_j||_2."""
    drop_rate = validate_drop_rate(options.drop_rate)
    delta = _as_float32(delta)
    if delta.dim() != 2:
        raise PruningParameterError(
            f"wanda prunes 2-D linear weights only, but {name!r} has shape {tuple(delta.shape)}; "
            "exclude it or store it with another method"
        )
    rows, columns = delta.shape  # (out_features, in_features)
    norms = options.input_norms
    if norms is None:
        raise PruningParameterError(
            f"wanda needs the input feature norms of {name!r}: pass calibration text"
        )
    norms = norms.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    if norms.numel() != columns:
        raise PruningParameterError(
            f"input norms of {name!r} have {norms.numel()} entries but the weight has "
            f"{columns} input features (shape {tuple(delta.shape)})"
        )

    count = keep_count(columns, drop_rate)
    if count == 0 or rows == 0:
        indices = torch.empty(0, dtype=torch.int64)
    else:
        scores = delta.abs() * norms  # (out_features, in_features)
        kept_columns = torch.topk(scores, count, dim=1, sorted=False).indices  # (rows, count)
        row_offsets = torch.arange(rows, dtype=torch.int64).unsqueeze(1) * columns
        indices = (row_offsets + kept_columns).reshape(-1)
    return _entry_from_indices(delta, indices, _importance_scale(options, drop_rate))


METHODS: dict[str, PruningMethod] = {
    method.name: method
    for method in (
        PruningMethod(
            name="dare",
            display_name="DARE",
            source="Yu et al., 2023, Language Models are Super Mario, arXiv 2311.03099",
            prune=prune_dare,
            parameters=("drop_rate", "seed"),
        ),
        PruningMethod(
            name="darex-q",
            display_name="DAREx-q",
            source="Deng et al., ICLR 2025, DARE the Extreme, arXiv 2410.09344",
            prune=prune_darex_q,
            parameters=("drop_rate", "seed", "q"),
            needs_q=True,
        ),
        PruningMethod(
            name="magnitude",
            display_name="Magnitude pruning",
            source="Deng et al., ICLR 2025, DARE the Extreme, arXiv 2410.09344 (MP baseline)",
            prune=prune_magnitude,
            parameters=("drop_rate", "rescale"),
            selected_count=magnitude_selected_count,
        ),
        PruningMethod(
            name="wanda",
            display_name="WANDA on the delta",
            source="Sun et al., 2023, A Simple and Effective Pruning Approach for LLMs, arXiv 2306.11695",
            prune=prune_wanda,
            parameters=("drop_rate", "rescale", "input_norms"),
            needs_input_norms=True,
            selected_count=wanda_selected_count,
        ),
    )
}


def get_method(name: str) -> PruningMethod:
    """Return the registered method called `name`, or raise with the known names."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise PruningParameterError(f"unknown pruning method {name!r}; choose one of: {known}") from None


def prune(delta: torch.Tensor, *, method: str, name: str, options: PruneOptions) -> Pruned:
    """Prune one delta tensor with the registered method `method`, by entries or by whole lines."""
    spec = get_method(method)
    if options.structure is not None:
        from deltastore.structural import prune_lines

        return prune_lines(delta, method=spec.name, name=name, options=options)
    return spec.prune(delta, name=name, options=options)
