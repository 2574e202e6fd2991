"""Measure how closely base plus a delta file reproduces the fine-tune it was made from.

Output change: the top-5 logit MSE of base + delta against the fine-tuned model over calibration
text, next to the same figure for the bare base (what having no delta at all would cost). With a
labelled file, the exact-match accuracy of the base, the fine-tuned and the pruned model.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from deltastore.apply import apply, decode, model_params, restore
from deltastore.calibration import read_calibration, read_validation, token_windows
from deltastore.checkpoint import fingerprint
from deltastore.format import read_delta
from deltastore.scoring import ScoreResult, load_causal_lm, output_change, reference_logits, score_model

logger = logging.getLogger(__name__)


class EvaluateError(ValueError):
    """An evaluation was requested without anything to measure."""


@dataclass(frozen=True)
class Evaluation:
    """Results of one evaluation; a field is None when its input file was not given."""

    task: str
    method: str
    params: dict
    nnz: int
    windows: int
    output_change_pruned: float | None
    output_change_base: float | None
    score_base: ScoreResult | None
    score_finetuned: ScoreResult | None
    score_pruned: ScoreResult | None

    def to_json(self) -> dict:
        record = asdict(self)
        for key in ("score_base", "score_finetuned", "score_pruned"):
            score = getattr(self, key)
            record[key] = None if score is None else {**asdict(score), "accuracy": score.accuracy}
        return record


def evaluate(
    delta_path: str | Path,
    *,
    base: str | Path,
    finetuned: str | Path,
    calibration: str | Path | None = None,
    validation: str | Path | None = None,
    device: str = "cpu",
    window_tokens: int = 256,
    max_windows: int = 64,
    max_new_tokens: int = 64,
) -> Evaluation:
    """Compare base + delta with the fine-tuned model on calibration text and/or a labelled file."""
    if calibration is None and validation is None:
        raise EvaluateError("evaluate needs calibration text, a labelled validation file, or both")

    # 1. Read the inputs and check the delta against this base before loading any model.
    texts = read_calibration(calibration) if calibration is not None else None
    samples = read_validation(validation) if validation is not None else None
    delta = read_delta(delta_path, expected_fingerprint=fingerprint(base))

    # 2. The fine-tuned model: reference logits and its own score, then free it.
    model, tokenizer = load_causal_lm(finetuned, device=device)
    windows = token_windows(tokenizer, texts, window_tokens=window_tokens, max_windows=max_windows) if texts else []
    reference = reference_logits(model, windows) if windows else None
    score_finetuned = score_model(model, tokenizer, samples, max_new_tokens=max_new_tokens) if samples else None
    del model

    # 3. The bare base, then the same model with the delta applied, restored at the end.
    model, tokenizer = load_causal_lm(base, device=device)
    change_base = output_change(model, reference) if reference else None
    score_base = score_model(model, tokenizer, samples, max_new_tokens=max_new_tokens) if samples else None
    params = model_params(model)
    applied = apply(params, decode(delta, device=next(model.parameters()).device))
    try:
        change_pruned = output_change(model, reference) if reference else None
        score_pruned = score_model(model, tokenizer, samples, max_new_tokens=max_new_tokens) if samples else None
    finally:
        restore(params, applied)

    result = Evaluation(
        task=delta.metadata.task,
        method=delta.metadata.method,
        params=delta.metadata.params,
        nnz=delta.metadata.nnz,
        windows=len(windows),
        output_change_pruned=change_pruned,
        output_change_base=change_base,
        score_base=score_base,
        score_finetuned=score_finetuned,
        score_pruned=score_pruned,
    )
    logger.info("evaluated %s: output change %s (base %s)", delta.metadata.task, change_pruned, change_base)
    return result
