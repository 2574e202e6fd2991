"""Per-layer analytical q for DAREx-q: one rescale per linear layer, from calibration activations.

Source: Deng et al., ICLR 2025, "DARE the Extreme" (arXiv 2410.09344), per-layer q. For a linear
layer with delta `D` (out, in) and `x_bar` the signed mean input of each feature over the
calibration tokens, let `c_ij = D_ij * x_bar_j`, with the bias delta as one more column whose
input is 1. Per output row `i`, with `S_i = sum_j c_ij` and `Q_i = sum_j c_ij^2`, the row's q is
the grid value in [1 - p, 1) (step 0.001) that minimises

    | eta * (1 - (1 - p) / q) * S_i  +  eta^2 * Phi(p) * Q_i / (4 q^2)  +  log(2 / gamma) |,
    Phi(p) = (1 - 2p) / log((1 - p) / p),   gamma = 0.05,

and the layer's q is the mean over its rows. Pruned tensors without calibration activations (not
the weight of an `nn.Linear`) get the mean of the layer values. The scalar `eta` is tuned like a
global q: by validation accuracy, or else by the top-5 logit MSE against the fine-tuned model.

As in the authors' code (vengdeng/DAREx, `utils/getwx.py` and `utils/analyticalq.py`), the mean
inputs come from the fine-tuned model. That code also stops scanning q once 80 % of the rows stop
improving, to limit outlier features; this module takes the plain argmin over the whole grid.

`S_i` and `Q_i` do not depend on eta or q, so they are computed once per tensor while its delta
streams past. Each eta candidate then costs one small (rows x grid) evaluation per layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from deltastore import methods
from deltastore.calibration import InputMeans, ValidationSample, token_windows
from deltastore.checkpoint import Checkpoint
from deltastore.compress import CompressError, TensorDelta, TensorPlan, load_finetuned_model
from deltastore.format import Entry
from deltastore.qselect import QSearchSettings, QSelection, QTracePoint, _collect_masked, decoded_entries, scaled_entries
from deltastore.scoring import load_causal_lm, output_change, reference_logits, score_model

logger = logging.getLogger(__name__)

GAMMA = 0.05
Q_STEP = 0.001
# eta candidates: 0.1 to 0.7 in steps of 0.1, around the authors' code default of 0.45.
ETA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass(frozen=True)
class RowSums:
    """Per output row of one layer: S = sum_j c_ij and Q = sum_j c_ij^2, in float64."""

    total: torch.Tensor  # (out_features,)
    squares: torch.Tensor  # (out_features,)


def phi(drop_rate: float) -> float:
    """Return Phi(p) = (1 - 2p) / log((1 - p) / p), with its limits 0 at p = 0 and 1/2 at p = 1/2."""
    p = methods.validate_drop_rate(drop_rate)
    if p == 0.0:
        return 0.0
    if abs(1.0 - 2.0 * p) < 1e-9:
        return 0.5
    return (1.0 - 2.0 * p) / math.log((1.0 - p) / p)


def q_grid(drop_rate: float, *, step: float = Q_STEP) -> torch.Tensor:
    """Return the candidate q values 1 - p, 1 - p + step, ... below 1, in float64 (empty at p = 0)."""
    p = methods.validate_drop_rate(drop_rate)
    count = math.ceil(round(p / step, 9))
    return (1.0 - p) + step * torch.arange(count, dtype=torch.float64)


def row_sums(delta: torch.Tensor, mean_input: torch.Tensor, *, bias_delta: torch.Tensor | None = None) -> RowSums:
    """Return S and Q per output row of `delta` (out, in) for the mean input `mean_input` (in,)."""
    if delta.dim() != 2 or mean_input.numel() != delta.shape[1]:
        raise methods.PruningParameterError(
            f"per-layer q needs a 2-D delta and one mean input per column, got delta {tuple(delta.shape)} "
            f"and {mean_input.numel()} mean inputs"
        )
    # float64: Q sums squares of products of small deltas and activations.
    contributions = delta.double() * mean_input.double().reshape(1, -1)  # (out, in)
    total = contributions.sum(dim=1)
    squares = contributions.pow(2).sum(dim=1)
    if bias_delta is not None:
        bias = bias_delta.double().reshape(-1)  # the bias column's input is 1
        total = total + bias
        squares = squares + bias.pow(2)
    return RowSums(total=total, squares=squares)


def row_q(sums: RowSums, *, drop_rate: float, eta: float, gamma: float = GAMMA) -> torch.Tensor:
    """Return each row's q: the grid value in [1 - p, 1) minimising the objective, as float64 (rows,)."""
    p = methods.validate_drop_rate(drop_rate)
    grid = q_grid(p)
    rows = sums.total.numel()
    if grid.numel() == 0:
        return torch.ones(rows, dtype=torch.float64)
    q = grid.reshape(1, -1)  # (1, grid)
    bias_term = eta * (1.0 - (1.0 - p) / q) * sums.total.reshape(-1, 1)  # (rows, grid)
    variance_term = eta**2 * phi(p) * sums.squares.reshape(-1, 1) / (4.0 * q**2)  # (rows, grid)
    objective = (bias_term + variance_term + math.log(2.0 / gamma)).abs()
    # argmin returns the first minimum, so ties go to the smaller q.
    return grid[objective.argmin(dim=1)]


def layer_q(sums: RowSums, *, drop_rate: float, eta: float) -> float:
    """Return one layer's q: the mean of its rows' q values (1 for a layer without rows)."""
    values = row_q(sums, drop_rate=drop_rate, eta=eta)
    return float(values.mean()) if values.numel() else 1.0


def layer_qs(
    sums: Mapping[str, RowSums], names: list[str], *, drop_rate: float, eta: float
) -> dict[str, float]:
    """Return q for every pruned tensor in `names`; those without row sums get the mean layer q."""
    values = {name: layer_q(sums[name], drop_rate=drop_rate, eta=eta) for name in names if name in sums}
    fallback = sum(values.values()) / len(values) if values else 1.0
    low = 1.0 - drop_rate
    # Clamp against float rounding of the mean, so every value passes validate_q.
    return {name: min(1.0, max(low, values.get(name, fallback))) for name in names}


def _bias_name(weight_name: str) -> str | None:
    return weight_name[: -len("weight")] + "bias" if weight_name.endswith(".weight") else None


def select_per_layer_q(
    *,
    base_checkpoint: Checkpoint,
    finetuned_checkpoint,
    plan: TensorPlan,
    drop_rate: float,
    seed: int,
    other_tensors: str,
    calibration_texts: list[str],
    validation_samples: list[ValidationSample] | None,
    device: str = "cpu",
    settings: QSearchSettings = QSearchSettings(),
    structure: str | None = None,
    eta: float | None = None,
) -> QSelection:
    """Choose eta (unless given) and return the per-layer q values with the compression seed's entries."""
    if not calibration_texts:
        raise CompressError("per-layer q needs calibration text for the mean input activations")
    use_validation = bool(validation_samples)
    seeds = [seed] if use_validation or eta is not None else [seed, seed + 1]

    # 1. One pass of the fine-tuned model over the calibration windows records the mean input of
    #    every linear layer and, for the output-change metric, its top-5 logits.
    finetuned_model, tokenizer = load_finetuned_model(finetuned_checkpoint, device=device)
    windows = token_windows(tokenizer, calibration_texts, window_tokens=settings.window_tokens, max_windows=settings.max_windows)
    with torch.no_grad(), InputMeans(finetuned_model) as hooks:
        reference = reference_logits(finetuned_model, windows)
    means = hooks.means()
    del finetuned_model

    # 2. Draw the masks once; S and Q of each row come from the full delta as it streams past.
    sums: dict[str, RowSums] = {}

    def record(item: TensorDelta) -> None:
        if item.name in means and item.delta.dim() == 2:
            sums[item.name] = row_sums(item.delta, means[item.name])

    # NOTE: the objective assumes one Bernoulli draw per entry. With a structure, whole rows or columns
    # are drawn together, so the per-layer q values are a heuristic there until a line-level bound replaces it.
    masked, dense = _collect_masked(
        base_checkpoint, finetuned_checkpoint, plan, drop_rate=drop_rate, seeds=seeds,
        other_tensors=other_tensors, structure=structure, inspect_delta=record,
    )
    for name, layer_sums in list(sums.items()):
        bias = dense.get(_bias_name(name) or "")
        if bias is not None and bias.values.numel() == layer_sums.total.numel():
            sums[name] = RowSums(total=layer_sums.total + bias.values.double(), squares=layer_sums.squares + bias.values.double().pow(2))
    names = sorted(masked[seed])
    missing = [name for name in names if name not in sums]
    if missing:
        logger.info("per-layer q: %d pruned tensors have no linear-layer activations and get the mean q: %s", len(missing), missing[:5])

    # 3. Tune eta on the base with each candidate's deltas applied, unless eta is given.
    trace: list[QTracePoint] = []
    score = None
    metric = "exact-match accuracy" if use_validation else "top-5 logit MSE"
    if eta is None:
        eta, score, trace = _search_eta(
            base_checkpoint, masked=masked, dense=dense, sums=sums, names=names, drop_rate=drop_rate,
            reference=None if use_validation else reference, validation_samples=validation_samples,
            settings=settings, device=device,
        )
    qs = layer_qs(sums, names, drop_rate=drop_rate, eta=eta)
    logger.info("per-layer q: eta %.3g, q from %.4f to %.4f over %d tensors", eta, min(qs.values(), default=1.0), max(qs.values(), default=1.0), len(qs))

    entries: dict[str, Entry] = {**scaled_entries(masked[seed], qs), **dense}
    mean_q = sum(qs.values()) / len(qs) if qs else 1.0
    return QSelection(
        selector="per-layer", metric=metric, q=mean_q, score=score, trace=trace, mask_seeds=seeds, entries=entries,
        layer_q=qs, eta=eta, parameter="eta",
    )


def _search_eta(
    base_checkpoint: Checkpoint,
    *,
    masked: dict,
    dense: dict,
    sums: dict[str, RowSums],
    names: list[str],
    drop_rate: float,
    reference,
    validation_samples: list[ValidationSample] | None,
    settings: QSearchSettings,
    device: str,
) -> tuple[float, float, list[QTracePoint]]:
    """Score every eta of ETA_GRID, then the midpoints beside the best; return (eta, score, trace)."""
    from deltastore.apply import apply, model_params, restore

    model, tokenizer = load_causal_lm(base_checkpoint.folder, device=device)
    params = model_params(model)
    model_device = next(model.parameters()).device
    maximize = reference is None
    trace: list[QTracePoint] = []

    def measure(eta: float) -> float:
        qs = layer_qs(sums, names, drop_rate=drop_rate, eta=eta)
        scores = []
        for entries in masked.values():
            applied = apply(params, decoded_entries({**scaled_entries(entries, qs), **dense}, model_device))
            try:
                if reference is not None:
                    scores.append(output_change(model, reference))
                else:
                    scores.append(score_model(model, tokenizer, validation_samples, max_new_tokens=settings.max_new_tokens).accuracy)
            finally:
                restore(params, applied)
        value = sum(scores) / len(scores)
        trace.append(QTracePoint(q=round(eta, 10), score=value))
        logger.info("per-layer q search: eta=%.3f score=%.6g", eta, value)
        return value

    def better(score: float, best: float) -> bool:
        return score > best if maximize else score < best

    best_eta, best_score = ETA_GRID[0], measure(ETA_GRID[0])
    for candidate in ETA_GRID[1:]:
        value = measure(candidate)
        if better(value, best_score):
            best_eta, best_score = candidate, value
    for candidate in (best_eta - 0.05, best_eta + 0.05):
        if candidate > 0:
            value = measure(candidate)
            if better(value, best_score):
                best_eta, best_score = candidate, value
    del model, params
    return round(best_eta, 10), best_score, trace
