"""Recommend a pruning method and drop rate for one fine-tune, following the DAREx selection pipeline.

The selection pipeline that Deng et al. (ICLR 2025, "DARE the Extreme", arXiv 2410.09344) give:

1. Large deltas (mean |delta| well above about 0.005, for example continued pre-training): random
   dropping fails, so prune by importance: magnitude, or WANDA when calibration text is given.
2. Small deltas: DARE at moderate drop rates. At high drop rates DAREx-q, with q chosen on labelled
   data if there is any, else on the unlabelled output change.

Statistics alone pick the family. With a labelled validation file or calibration text, a short
search then scores that family's methods at a few drop rates on the base with each candidate delta
applied, and picks the highest drop rate whose quality loss stays within `max_loss` points:
accuracy points against the fine-tune on validation data, or else the percentage of the base's
top-5 logit MSE against the fine-tune that the candidate leaves.
"""

from __future__ import annotations

import logging
import math
import shlex
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deltastore.calibration import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_WINDOW_TOKENS,
    ValidationSample,
    read_calibration,
    read_validation,
)
from deltastore.checkpoint import Checkpoint
from deltastore.compress import (
    CompressError,
    CompressOptions,
    TensorPlan,
    prune_entries,
    iter_deltas,
    load_finetuned_model,
    open_pair,
    plan_tensors,
)
from deltastore.format import Entry, write_delta
from deltastore.lora import LoraCheckpoint, open_lora_pair
from deltastore.scoring import DEFAULT_MAX_NEW_TOKENS

logger = logging.getLogger(__name__)

# DARE's authors report it works while mean |delta| stays below about 0.002 to 0.005; above the upper
# end this module treats a fine-tune as large-delta.
LARGE_DELTA = 0.005
DEFAULT_DROP_RATES = (0.5, 0.7, 0.9, 0.95, 0.99)
DEFAULT_MAX_LOSS = 1.0
# Drop rates used without data: DARE at a moderate rate for small deltas, importance pruning at half for large ones.
UNSEARCHED_DROP_RATE = {"small": 0.5, "large": 0.5}
VALUE_BYTES = 2  # float16 values, the compress default


@dataclass(frozen=True)
class LayerStats:
    """Mean and standard deviation of |delta| over one pruned tensor."""

    name: str
    numel: int
    mean_abs: float
    std_abs: float


@dataclass(frozen=True)
class DeltaStats:
    """|delta| statistics of the pruned tensors, and the size of the changed tensors kept dense."""

    layers: list[LayerStats]
    dense_numel: int
    base_numel: int

    @property
    def pruned_numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def mean_abs(self) -> float:
        """Mean |delta| over every pruned entry (weighted by tensor size)."""
        total = self.pruned_numel
        return sum(layer.mean_abs * layer.numel for layer in self.layers) / total if total else 0.0

    @property
    def large(self) -> bool:
        return self.mean_abs > LARGE_DELTA


@dataclass(frozen=True)
class Candidate:
    """One scored method and drop rate of the search."""

    method: str
    drop_rate: float
    q: float | None
    q_select: str | None
    score: float
    loss: float
    nbytes: int


@dataclass(frozen=True)
class Recommendation:
    """The recommended compression, its expected size and quality, and the reasons for it."""

    method: str
    drop_rate: float
    q_select: str | None
    expected_nbytes: int
    expected_quality: str
    reasons: list[str]
    stats: DeltaStats
    candidates: list[Candidate] = field(default_factory=list)
    metric: str | None = None

    def arguments(self, *, calibration: Path | None, validation: Path | None) -> list[str]:
        """Return the `deltamux compress` options that carry out this recommendation."""
        args = ["--method", self.method, "--drop-rate", f"{self.drop_rate:g}"]
        if self.q_select is not None:
            args += ["--q-select", self.q_select]
        if (self.q_select in ("output-change", "per-layer") or self.method == "wanda") and calibration is not None:
            args += ["--calibration", str(calibration)]
        if self.q_select == "validation" and validation is not None:
            args += ["--validation", str(validation)]
        return args

    def command(self, *, base: Path, source: list[str], calibration: Path | None, validation: Path | None) -> str:
        words = ["deltamux", "compress", "--base", str(base), *source, "--task", "TASK", "--store", "STORE"]
        words += self.arguments(calibration=calibration, validation=validation)
        return shlex.join(words)

    def to_json(self) -> dict:
        record = asdict(self)
        record["stats"] = {"mean_abs": self.stats.mean_abs, "large": self.stats.large, **record["stats"]}
        return record


# ---------------------------------------------------------------------------------------------
# Statistics


def delta_statistics(base_checkpoint, finetuned_checkpoint, plan: TensorPlan) -> DeltaStats:
    """Stream every changed tensor once and return |delta| statistics of the pruned ones."""
    layers, dense_numel = [], 0
    for item in iter_deltas(base_checkpoint, finetuned_checkpoint, plan, other_tensors="exact", description="statistics"):
        if not item.pruned:
            dense_numel += item.delta.numel()
            continue
        magnitude = item.delta.abs().double()  # float64: means of millions of small values
        std = float(magnitude.std()) if magnitude.numel() > 1 else 0.0
        layers.append(LayerStats(item.name, magnitude.numel(), float(magnitude.mean()), std))
    return DeltaStats(layers=layers, dense_numel=dense_numel, base_numel=base_checkpoint.numel())


def expected_nbytes(stats: DeltaStats, drop_rate: float, *, value_bytes: int = VALUE_BYTES) -> int:
    """Estimate a delta file's payload: kept values with 2-byte positions, plus dense tensors in float32."""
    kept = round(stats.pruned_numel * (1.0 - drop_rate))
    return kept * (value_bytes + 2) + stats.dense_numel * 4


# ---------------------------------------------------------------------------------------------
# The pipeline


def family(stats: DeltaStats, *, has_calibration: bool) -> tuple[str, ...]:
    """Return the methods the selection pipeline allows for these statistics."""
    if stats.large:
        return ("magnitude", "wanda") if has_calibration else ("magnitude",)
    return ("dare", "darex-q")


def recommend(
    *,
    base: str | Path,
    finetuned: str | Path | None = None,
    lora: str | Path | None = None,
    validation: str | Path | None = None,
    calibration: str | Path | None = None,
    max_loss: float = DEFAULT_MAX_LOSS,
    drop_rates: tuple[float, ...] = DEFAULT_DROP_RATES,
    fixed_drop_rate: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    window_tokens: int = DEFAULT_WINDOW_TOKENS,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Recommendation:
    """Recommend a method and drop rate for `finetuned` (or a LoRA adapter) against `base`.

    `fixed_drop_rate` replaces `drop_rates` when given, so only the method is chosen.
    """
    if (finetuned is None) == (lora is None):
        raise CompressError("pass exactly one of a fine-tuned checkpoint or a LoRA adapter folder")
    if not (isinstance(max_loss, (int, float)) and math.isfinite(max_loss) and max_loss >= 0):
        raise CompressError(f"max loss must be a non-negative number of points, got {max_loss!r}")
    if fixed_drop_rate is not None:
        drop_rates = (fixed_drop_rate,)
    if not drop_rates:
        raise CompressError("the search needs at least one drop rate")
    drop_rates = tuple(sorted(CompressOptions(task="x", method="dare", drop_rate=p).drop_rate for p in drop_rates))

    # 1. Statistics of the pruned tensors decide the method family.
    if lora is not None:
        base_checkpoint, finetuned_checkpoint = open_lora_pair(base, lora)
    else:
        base_checkpoint, finetuned_checkpoint = open_pair(base, finetuned)
    plan = plan_tensors(base_checkpoint, CompressOptions(task="recommend", method="dare", drop_rate=0.5))
    stats = delta_statistics(base_checkpoint, finetuned_checkpoint, plan)
    methods = family(stats, has_calibration=calibration is not None)
    size_text = "large" if stats.large else "small"
    reasons = [
        f"mean |delta| over the {len(stats.layers)} pruned tensors is {stats.mean_abs:.3g}, "
        f"{'above' if stats.large else 'at or below'} {LARGE_DELTA}: a {size_text}-delta fine-tune",
    ]
    if stats.large:
        reasons.append("random dropping (DARE) fails on large deltas, so prune by importance (magnitude or WANDA)")
    else:
        reasons.append("small deltas suit random dropping: DARE at moderate drop rates, DAREx-q with a chosen q at high ones")

    # 2. Without data, apply the pipeline's defaults.
    if validation is None and calibration is None:
        method = methods[0]
        drop_rate = drop_rates[0] if fixed_drop_rate is not None else UNSEARCHED_DROP_RATE[size_text]
        reasons.append(
            f"no validation or calibration data, so no search: {method} at drop rate {drop_rate:g}; "
            "pass --calibration or --validation to search higher drop rates"
        )
        if not stats.large and drop_rate >= 0.9:
            reasons.append("at drop rates of 0.9 and above DAREx-q with a chosen q usually keeps far more quality than DARE; it needs data")
        return Recommendation(
            method=method, drop_rate=drop_rate, q_select=None, expected_nbytes=expected_nbytes(stats, drop_rate),
            expected_quality="not measured (no data given)", reasons=reasons, stats=stats,
        )

    # 3. With data, score the family's methods at each drop rate.
    searcher = _Searcher(
        base_checkpoint=base_checkpoint, finetuned_checkpoint=finetuned_checkpoint, plan=plan, seed=seed,
        validation=read_validation(validation) if validation is not None else None,
        calibration=read_calibration(calibration) if calibration is not None else None,
        calibration_path=None if calibration is None else Path(calibration),
        device=device, window_tokens=window_tokens, max_windows=max_windows, max_new_tokens=max_new_tokens,
    )
    candidates = [searcher.score(method, drop_rate) for drop_rate in drop_rates for method in methods]
    searcher.close()
    within = [c for c in candidates if c.loss <= max_loss]
    if within:
        best = max(within, key=lambda c: (c.drop_rate, -c.loss))
        reasons.append(
            f"searched {', '.join(methods)} at drop rates {', '.join(f'{p:g}' for p in drop_rates)} on {searcher.data_name}: "
            f"the highest drop rate within {max_loss:g} points of the fine-tune is {best.drop_rate:g}, best there: {best.method}"
        )
    else:
        best = min(candidates, key=lambda c: (c.loss, -c.drop_rate))
        reasons.append(
            f"no candidate stays within {max_loss:g} points of the fine-tune on {searcher.data_name}; "
            f"the smallest loss is {best.loss:.3g} points ({best.method} at drop rate {best.drop_rate:g}); "
            "try lower drop rates or a larger --max-loss"
        )
    return Recommendation(
        method=best.method, drop_rate=best.drop_rate, q_select=best.q_select, expected_nbytes=best.nbytes,
        expected_quality=f"{searcher.metric} {best.score:.4g}, a loss of {best.loss:.3g} points ({searcher.loss_unit})",
        reasons=reasons, stats=stats, candidates=candidates, metric=searcher.metric,
    )


class _Searcher:
    """Scores candidate deltas on the base model: validation accuracy, or top-5 logit MSE to the fine-tune."""

    def __init__(
        self,
        *,
        base_checkpoint: Checkpoint,
        finetuned_checkpoint: Checkpoint | LoraCheckpoint,
        plan: TensorPlan,
        seed: int,
        validation: list[ValidationSample] | None,
        calibration: list[str] | None,
        calibration_path: Path | None,
        device: str,
        window_tokens: int,
        max_windows: int,
        max_new_tokens: int,
    ) -> None:
        from deltastore.apply import model_params
        from deltastore.calibration import token_windows
        from deltastore.scoring import load_causal_lm, output_change, reference_logits, score_model

        self.base_checkpoint, self.finetuned_checkpoint, self.plan = base_checkpoint, finetuned_checkpoint, plan
        self.seed, self.device = seed, device
        self.validation, self.calibration, self.calibration_path = validation, calibration, calibration_path
        self.settings = dict(window_tokens=window_tokens, max_windows=max_windows, max_new_tokens=max_new_tokens)

        # The fine-tune's own quality is the reference every loss is measured against.
        finetuned_model, tokenizer = load_finetuned_model(finetuned_checkpoint, device=device)
        if validation is not None:
            self.metric, self.data_name, self.loss_unit = "exact-match accuracy", "the validation file", "accuracy points"
            self.reference_score = score_model(finetuned_model, tokenizer, validation, max_new_tokens=max_new_tokens).accuracy
        else:
            windows = token_windows(tokenizer, calibration, window_tokens=window_tokens, max_windows=max_windows)
            self.reference = reference_logits(finetuned_model, windows)
            self.metric, self.data_name = "top-5 logit MSE", "the calibration text"
            self.loss_unit = "percent of the base's logit MSE to the fine-tune"
        del finetuned_model

        self.model, self.tokenizer = load_causal_lm(base_checkpoint.folder, device=device)
        self.params = model_params(self.model)
        self._output_change, self._score_model = output_change, score_model
        self.base_score = self._measure()
        self._input_norms = None

    def _measure(self) -> float:
        if self.validation is not None:
            return self._score_model(self.model, self.tokenizer, self.validation, max_new_tokens=self.settings["max_new_tokens"]).accuracy
        return self._output_change(self.model, self.reference)

    def _loss(self, score: float) -> float:
        if self.validation is not None:
            return 100.0 * (self.reference_score - score)
        return 100.0 * score / self.base_score if self.base_score > 0 else 0.0

    def _entries(self, method: str, drop_rate: float) -> tuple[dict[str, Entry], float | None, str | None]:
        from deltastore import qselect

        if method == "darex-q":
            selector = "validation" if self.validation is not None else "output-change"
            # A short search: a coarse grid of 10 steps, no fine grid.
            settings = qselect.QSearchSettings(coarse_steps=10, patience=2, refine_factor=1, **self.settings)
            selection = qselect.select_q(
                selector=selector, base_checkpoint=self.base_checkpoint, finetuned_checkpoint=self.finetuned_checkpoint,
                plan=self.plan, drop_rate=drop_rate, seed=self.seed, other_tensors="exact",
                calibration_texts=self.calibration, validation_samples=self.validation, device=self.device,
                settings=settings,
            )
            return selection.entries, selection.q, selector
        options = CompressOptions(
            task="recommend", method=method, drop_rate=drop_rate, seed=self.seed, calibration=self.calibration_path,
            **self.settings,
        )
        norms = {}
        if method == "wanda":
            if self._input_norms is None:
                from deltastore.compress import finetuned_input_norms

                self._input_norms = finetuned_input_norms(self.finetuned_checkpoint, self.calibration, options=options)
            norms = self._input_norms
        return prune_entries(self.base_checkpoint, self.finetuned_checkpoint, self.plan, options, norms), None, None

    def score(self, method: str, drop_rate: float) -> Candidate:
        from deltastore.apply import apply, restore
        from deltastore.qselect import decoded_entries

        entries, q, q_select = self._entries(method, drop_rate)
        applied = apply(self.params, decoded_entries(entries, next(self.model.parameters()).device, task="recommend"))
        try:
            score = self._measure()
        finally:
            restore(self.params, applied)
        candidate = Candidate(method=method, drop_rate=drop_rate, q=q, q_select=q_select, score=score,
                              loss=self._loss(score), nbytes=_payload_bytes(entries))
        logger.info("recommend: %s at drop rate %g: %s %.6g, loss %.3g points", method, drop_rate, self.metric, score, candidate.loss)
        return candidate

    def close(self) -> None:
        del self.model, self.params


def _payload_bytes(entries: dict[str, Entry]) -> int:
    """Return the payload bytes these entries take in a delta file with float16 values."""
    with tempfile.TemporaryDirectory(prefix="deltamux-recommend-") as folder:
        metadata = write_delta(
            Path(folder) / "candidate.delta.safetensors", task="candidate", base_fingerprint="sha256:0",
            method="candidate", params={}, entries=entries,
        )
    return metadata.nbytes
