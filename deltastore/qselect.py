"""Choose the DAREx-q rescale q by a 1-D search over [1 - drop_rate, 1].

DAREx-q (Deng et al., ICLR 2025, "DARE the Extreme", arXiv 2410.09344) divides the kept delta
entries by q instead of 1 - p: a larger q trades a small bias for much less variance. Two
selectors are implemented, both with one global q:

- `validation`: maximise exact-match accuracy on a labelled file (scoring.score_model);
- `output-change`: minimise the MSE between the pruned model's logits and the fine-tuned model's,
  at the fine-tuned model's top-5 tokens over calibration text, averaged over several mask seeds.

The search walks a coarse grid upward from q = 1 - p (plain DARE), stops after `patience`
steps without improvement, then tries a grid ten times finer around the best q. The masks depend
only on the seed and the tensor name, never on q, so they are drawn once, and the mask of the
compression seed is exactly the one written to the delta file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deltastore import methods
from deltastore.apply import DecodedDelta, apply, decode_entry, model_params, restore
from deltastore.calibration import ValidationSample, token_windows
from deltastore.checkpoint import Checkpoint
from deltastore.compress import CompressError, TensorDelta, TensorPlan, iter_deltas, load_finetuned_model
from deltastore.format import DenseEntry, Entry
from deltastore.methods import Pruned
from deltastore.scoring import load_causal_lm, output_change, reference_logits, score_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QSelector:
    """One way of scoring a candidate q."""

    name: str
    metric: str
    maximize: bool
    mask_seeds: int


Q_SELECTORS: dict[str, QSelector] = {
    selector.name: selector
    for selector in (
        QSelector(name="validation", metric="exact-match accuracy", maximize=True, mask_seeds=1),
        QSelector(name="output-change", metric="top-5 logit MSE", maximize=False, mask_seeds=2),
        # Per-layer q: eta is tuned by validation accuracy when a labelled file is given, else by output change.
        QSelector(name="per-layer", metric="per-row objective; eta by accuracy or top-5 logit MSE", maximize=True, mask_seeds=1),
    )
}


@dataclass(frozen=True)
class QSearchSettings:
    """Grid and budget of the q search."""

    # The coarse grid splits [1 - p, 1] into this many steps.
    coarse_steps: int = 20
    # Coarse steps without improvement before the coarse walk stops.
    patience: int = 4
    # The fine grid's step is the coarse step divided by this.
    refine_factor: int = 10
    window_tokens: int = 256
    max_windows: int = 64
    max_new_tokens: int = 64


@dataclass(frozen=True)
class QTracePoint:
    """One evaluated candidate: q and its metric value."""

    q: float
    score: float


@dataclass(frozen=True)
class QSelection:
    """The chosen q, how it was found, and the pruned entries of the compression seed at that q."""

    selector: str
    metric: str
    q: float
    # None when nothing was searched (a per-layer selection with a given eta).
    score: float | None
    trace: list[QTracePoint]
    mask_seeds: list[int]
    entries: dict[str, Entry]
    # Per-layer selection only: q per pruned tensor name, and the eta that produced them.
    layer_q: dict[str, float] | None = None
    eta: float | None = None
    # What the trace varies: "q" for a global search, "eta" for the per-layer one.
    parameter: str = "q"

    def summary(self) -> dict:
        """Return the JSON-ready record stored in the delta file's params."""
        record = {
            "selector": self.selector,
            "metric": self.metric,
            "q": self.q,
            "score": self.score,
            "mask_seeds": self.mask_seeds,
            "parameter": self.parameter,
            "trace": [[point.q, point.score] for point in self.trace],
        }
        if self.eta is not None:
            record["eta"] = self.eta
        return record


def search_q(
    measure: Callable[[float], float],
    *,
    drop_rate: float,
    maximize: bool,
    settings: QSearchSettings = QSearchSettings(),
) -> tuple[float, float, list[QTracePoint]]:
    """Search q in [1 - drop_rate, 1] and return (best q, its score, the trace in evaluation order)."""
    low = 1.0 - methods.validate_drop_rate(drop_rate)
    trace: list[QTracePoint] = []
    seen: dict[float, float] = {}

    def evaluate(q: float) -> float:
        q = min(1.0, max(low, round(q, 10)))
        if q not in seen:
            seen[q] = float(measure(q))
            trace.append(QTracePoint(q=q, score=seen[q]))
            logger.info("q search: q=%.6f score=%.6g", q, seen[q])
        return seen[q]

    def better(score: float, best: float) -> bool:
        return score > best if maximize else score < best

    # 1. Coarse walk upward from plain DARE, stopping after `patience` steps without improvement.
    step = (1.0 - low) / settings.coarse_steps
    best_q, best_score = low, evaluate(low)
    misses = 0
    for index in range(1, settings.coarse_steps + 1 if step > 0 else 1):
        q = low + index * step
        score = evaluate(q)
        if better(score, best_score):
            best_q, best_score, misses = q, score, 0
        else:
            misses += 1
            if misses >= settings.patience:
                break

    # 2. Fine grid around the best coarse q, one coarse step either side.
    fine_step = step / settings.refine_factor
    center = best_q
    for index in range(1, settings.refine_factor if step > 0 else 1):
        for q in (center - index * fine_step, center + index * fine_step):
            if low <= q <= 1.0:
                score = evaluate(q)
                if better(score, best_score):
                    best_q, best_score = q, score

    best_q = min(1.0, max(low, round(best_q, 10)))
    return best_q, best_score, trace


def _collect_masked(
    base_checkpoint: Checkpoint,
    finetuned_checkpoint: Checkpoint,
    plan: TensorPlan,
    *,
    drop_rate: float,
    seeds: list[int],
    other_tensors: str,
    structure: str | None = None,
    inspect_delta: Callable[[TensorDelta], None] | None = None,
) -> tuple[dict[int, dict[str, Pruned]], dict[str, DenseEntry]]:
    """Draw each seed's DARE mask once and keep the unscaled kept values (q = 1).

    `inspect_delta`, when given, is called with every pruned tensor's full float32 delta before it is freed.
    """
    masked: dict[int, dict[str, Pruned]] = {seed: {} for seed in seeds}
    dense: dict[str, DenseEntry] = {}
    for item in iter_deltas(base_checkpoint, finetuned_checkpoint, plan, other_tensors=other_tensors, description="mask"):
        if not item.pruned:
            dense[item.name] = DenseEntry(shape=tuple(item.delta.shape), values=item.delta)
            continue
        if inspect_delta is not None:
            inspect_delta(item)
        for seed in seeds:
            options = methods.PruneOptions(drop_rate=drop_rate, seed=seed, q=1.0, structure=structure)
            masked[seed][item.name] = methods.prune(item.delta, method="darex-q", name=item.name, options=options)
    return masked, dense


def scaled_entries(masked: dict[str, Pruned], q: float | dict[str, float]) -> dict[str, Pruned]:
    """Divide the kept values of each entry by q: one global q, or one q per tensor name."""
    # The same float32 product as methods.prune_darex_q, so the written values match it bit for bit.
    return {
        name: dataclasses.replace(entry, values=entry.values * (1.0 / (q[name] if isinstance(q, dict) else q)))
        for name, entry in masked.items()
    }


def decoded_entries(entries: dict[str, Entry], device: torch.device, *, task: str = "q-search") -> DecodedDelta:
    """Decode in-memory entries onto `device`, as `apply.decode` does for a file."""
    tensors = [decode_entry(name, entry, device=device) for name, entry in entries.items()]
    nnz = sum(entry.values.numel() for entry in entries.values())
    return DecodedDelta(task=task, tensors=tensors, device=device, nnz=nnz)


def _decoded(sparse: dict[str, Pruned], dense: dict[str, DenseEntry], device: torch.device) -> DecodedDelta:
    return decoded_entries({**sparse, **dense}, device)


def select_q(
    *,
    selector: str,
    base_checkpoint: Checkpoint,
    finetuned_checkpoint: Checkpoint,
    plan: TensorPlan,
    drop_rate: float,
    seed: int,
    other_tensors: str,
    calibration_texts: list[str] | None,
    validation_samples: list[ValidationSample] | None,
    device: str = "cpu",
    settings: QSearchSettings = QSearchSettings(),
    structure: str | None = None,
    eta: float | None = None,
) -> QSelection:
    """Choose q with `selector` and return it with the compression seed's entries at that q."""
    if selector not in Q_SELECTORS:
        raise CompressError(f"invalid q selector {selector!r}; choose one of {', '.join(Q_SELECTORS)}")
    if selector == "per-layer":
        from deltastore.perlayer import select_per_layer_q

        return select_per_layer_q(
            base_checkpoint=base_checkpoint, finetuned_checkpoint=finetuned_checkpoint, plan=plan,
            drop_rate=drop_rate, seed=seed, other_tensors=other_tensors, calibration_texts=calibration_texts,
            validation_samples=validation_samples, device=device, settings=settings, structure=structure, eta=eta,
        )
    spec = Q_SELECTORS[selector]
    if selector == "validation" and not validation_samples:
        raise CompressError("q selection 'validation' needs labelled validation samples")
    if selector == "output-change" and not calibration_texts:
        raise CompressError("q selection 'output-change' needs calibration text")
    seeds = [seed + offset for offset in range(spec.mask_seeds)]

    # 1. Draw the masks once per seed; only q changes between candidates.
    masked, dense = _collect_masked(
        base_checkpoint,
        finetuned_checkpoint,
        plan,
        drop_rate=drop_rate,
        seeds=seeds,
        other_tensors=other_tensors,
        structure=structure,
    )

    # 2. For output change, record the fine-tuned model's top-5 logits, then free that model.
    reference = None
    if selector == "output-change":
        finetuned_model, tokenizer = load_finetuned_model(finetuned_checkpoint, device=device)
        windows = token_windows(
            tokenizer, calibration_texts, window_tokens=settings.window_tokens, max_windows=settings.max_windows
        )
        reference = reference_logits(finetuned_model, windows)
        del finetuned_model

    # 3. Load the base once; every candidate is applied onto it and restored afterwards.
    model, tokenizer = load_causal_lm(base_checkpoint.folder, device=device)
    params = model_params(model)
    model_device = next(model.parameters()).device

    def metric() -> float:
        if reference is not None:
            return output_change(model, reference)
        return score_model(model, tokenizer, validation_samples, max_new_tokens=settings.max_new_tokens).accuracy

    def measure(q: float) -> float:
        scores = []
        for mask_seed in seeds:
            applied = apply(params, _decoded(scaled_entries(masked[mask_seed], q), dense, model_device))
            try:
                scores.append(metric())
            finally:
                restore(params, applied)
        return sum(scores) / len(scores)

    # 4. Search, then keep the compression seed's entries at the chosen q.
    q, score, trace = search_q(measure, drop_rate=drop_rate, maximize=spec.maximize, settings=settings)
    logger.info("q search (%s): chose q=%.6f with %s %.6g after %d candidates", selector, q, spec.metric, score, len(trace))
    del model, params
    entries: dict[str, Entry] = {**scaled_entries(masked[seed], q), **dense}
    return QSelection(
        selector=selector, metric=spec.metric, q=q, score=score, trace=trace, mask_seeds=seeds, entries=entries
    )
