"""The compression pipeline: a base and a fine-tuned checkpoint in, one task's delta file out.

Both checkpoints are read one tensor at a time and each delta is computed in float32, so peak
memory is the kept entries plus a few tensors, never two whole models. By default the 2-D weights
of attention and MLP linear layers are pruned with the chosen method. Every other tensor that
changed (norms, biases, embeddings) is stored dense (`other_tensors="exact"`) or left out
(`"drop"`), and tensors equal in both checkpoints are skipped.

The fine-tune may also be a PEFT LoRA adapter folder (lora.py), whose delta is formed directly
from its factors. A `structure` prunes whole rows or columns (structural.py) instead of entries,
and method "auto" asks the recommender (recommend.py) for the method and drop rate.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltastore import methods
from deltastore.calibration import DEFAULT_MAX_WINDOWS, DEFAULT_WINDOW_TOKENS, read_calibration, read_validation
from deltastore.checkpoint import Checkpoint, fingerprint
from deltastore.lora import LoraCheckpoint, open_lora_pair
from deltastore.format import (
    VALUE_DTYPES,
    DeltaMetadata,
    DenseEntry,
    Entry,
    delta_file_name,
    validate_task_name,
    write_delta,
)
from deltastore.scoring import DEFAULT_MAX_NEW_TOKENS

logger = logging.getLogger(__name__)

# Tensor-name patterns of the linear weights that are pruned by default: Llama / Mistral / Qwen
# names first, then the equivalents in GPT-2, GPT-NeoX / Falcon, Phi and Mixtral-style checkpoints.
DEFAULT_PRUNED_PATTERNS: tuple[str, ...] = (
    "*.q_proj.weight",
    "*.k_proj.weight",
    "*.v_proj.weight",
    "*.o_proj.weight",
    "*.qkv_proj.weight",
    "*.gate_proj.weight",
    "*.up_proj.weight",
    "*.down_proj.weight",
    "*.gate_up_proj.weight",
    "*.attn.c_attn.weight",
    "*.attn.c_proj.weight",
    "*.mlp.c_fc.weight",
    "*.mlp.c_proj.weight",
    "*.query_key_value.weight",
    "*.attention.dense.weight",
    "*.self_attention.dense.weight",
    "*.dense_h_to_4h.weight",
    "*.dense_4h_to_h.weight",
    "*.mlp.fc1.weight",
    "*.mlp.fc2.weight",
    "*.self_attn.dense.weight",
    "*.experts.*.w1.weight",
    "*.experts.*.w2.weight",
    "*.experts.*.w3.weight",
)

# Output-embedding names that share storage with the input embedding when the config ties them.
TIED_OUTPUT_NAMES: tuple[str, ...] = ("lm_head.weight",)

# The method name that lets the recommender (recommend.py) choose the method and drop rate.
AUTO_METHOD = "auto"

# Relative gap between the kept share asked for and the one a method keeps after rounding, above
# which compression warns: 1 % of the kept entries.
EFFECTIVE_KEPT_TOLERANCE = 0.01

# Policies for a changed tensor that is not pruned: store it dense, or leave it out of the delta.
OTHER_TENSOR_POLICIES: tuple[str, ...] = ("exact", "drop")


class CompressError(ValueError):
    """The inputs of a compression do not fit together (names, shapes, values or options)."""


class EmptyDeltaError(CompressError):
    """The delta stores no value, so the file would change nothing (pass allow_empty to write it)."""


@dataclass(frozen=True)
class CompressOptions:
    """Everything that decides what a compression writes, checked when the record is built."""

    task: str
    method: str
    drop_rate: float
    seed: int = 0
    q: float | None = None
    q_select: str | None = None
    calibration: Path | None = None
    validation: Path | None = None
    other_tensors: str = "exact"
    # Patterns of tensor names to prune; None means DEFAULT_PRUNED_PATTERNS.
    include: tuple[str, ...] | None = None
    # Patterns of tensor names never pruned; they follow `other_tensors` instead.
    exclude: tuple[str, ...] = ()
    value_dtype: str = "float16"
    rescale: bool = False
    device: str = "cpu"
    # Budget of the model runs in q search and WANDA calibration.
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    max_windows: int = DEFAULT_MAX_WINDOWS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    # "rows" or "columns": keep or drop whole lines of each pruned delta; None prunes entries.
    structure: str | None = None
    # Per-layer q only: a fixed eta instead of the search over eta.
    eta: float | None = None
    # Write the file even when the delta stores no value (the fine-tune equals the base).
    allow_empty: bool = False

    def __post_init__(self) -> None:
        validate_task_name(self.task)
        method = methods.get_method(self.method)
        object.__setattr__(self, "drop_rate", methods.validate_drop_rate(self.drop_rate))
        if self.q is not None and self.q_select is not None:
            raise CompressError(f"pass either q ({self.q!r}) or a q selector ({self.q_select!r}), not both")
        if (self.q is not None or self.q_select is not None) and not method.needs_q:
            raise CompressError(f"q and q selection apply to darex-q only, not to method {self.method!r}")
        if self.q is not None:
            object.__setattr__(self, "q", methods.validate_q(self.q, self.drop_rate))
        if method.needs_q and self.q is None and self.q_select is None:
            raise CompressError(
                f"darex-q needs q in [{1 - self.drop_rate:g}, 1] or a q selector ('validation' with a labelled "
                "file, 'output-change' or 'per-layer' with calibration text)"
            )
        if self.rescale and "rescale" not in method.parameters:
            raise CompressError(f"rescale applies to magnitude and wanda only; {self.method!r} always rescales")
        self._check_inputs(method)
        if self.other_tensors not in OTHER_TENSOR_POLICIES:
            raise CompressError(
                f"invalid other-tensors policy {self.other_tensors!r}; choose one of {', '.join(OTHER_TENSOR_POLICIES)}"
            )
        for key in ("window_tokens", "max_windows", "max_new_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (2 if key == "window_tokens" else 1):
                raise CompressError(f"{key} must be a positive integer (window_tokens at least 2), got {value!r}")
        if self.value_dtype not in VALUE_DTYPES:
            raise CompressError(f"invalid value dtype {self.value_dtype!r}; choose one of {', '.join(VALUE_DTYPES)}")
        if self.structure is not None:
            from deltastore.structural import validate_structure

            validate_structure(self.structure)
        if self.eta is not None and (self.q_select != "per-layer" or not (0.0 < float(self.eta) <= 10.0)):
            raise CompressError(f"eta {self.eta!r} applies to --q-select per-layer only and must lie in (0, 10]")

    def _check_inputs(self, method: methods.PruningMethod) -> None:
        from deltastore.qselect import Q_SELECTORS

        if self.q_select is not None and self.q_select not in Q_SELECTORS:
            raise CompressError(f"invalid q selector {self.q_select!r}; choose one of {', '.join(Q_SELECTORS)}")
        if self.q_select == "validation" and self.validation is None:
            raise CompressError("q selection 'validation' needs a labelled validation file (JSONL with prompt, completion)")
        needs_calibration = self.q_select in ("output-change", "per-layer")
        if (needs_calibration or method.needs_input_norms) and self.calibration is None:
            requester = f"q selection {self.q_select!r}" if needs_calibration else f"method {self.method!r}"
            raise CompressError(f"{requester} needs a calibration text file (one sample per line, or JSONL with 'text')")

    @property
    def pruned_patterns(self) -> tuple[str, ...]:
        return DEFAULT_PRUNED_PATTERNS if self.include is None else self.include


@dataclass(frozen=True)
class TensorPlan:
    """Assignment of checkpoint tensors: pruned, other (dense or dropped), and tied (left out)."""

    pruned: list[str]
    other: list[str]
    # Tied output embeddings, read through the input embedding instead.
    tied: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Checking and planning


def open_pair(base: str | Path, finetuned: str | Path) -> tuple[Checkpoint, Checkpoint]:
    """Open a base and a fine-tuned checkpoint and raise unless they have the same tensors and shapes."""
    base_checkpoint = Checkpoint.open(base)
    finetuned_checkpoint = Checkpoint.open(finetuned)

    base_type = base_checkpoint.config.get("model_type")
    finetuned_type = finetuned_checkpoint.config.get("model_type")
    if base_type and finetuned_type and base_type != finetuned_type:
        raise CompressError(
            f"base {str(base)!r} is a {base_type!r} model but fine-tune {str(finetuned)!r} is a {finetuned_type!r} model; "
            "compress a fine-tune against the base it was trained from"
        )

    tied = base_checkpoint.tied_embeddings
    if finetuned_checkpoint.tied_embeddings != tied:
        raise CompressError(
            f"tie_word_embeddings is {tied} in the base but {finetuned_checkpoint.tied_embeddings} in the fine-tune "
            f"{str(finetuned)!r}; an untied output embedding cannot be stored as a delta of a tied one"
        )
    base_names = set(_untied_names(base_checkpoint.names, tied=tied))
    finetuned_names = set(_untied_names(finetuned_checkpoint.names, tied=tied))
    if base_names != finetuned_names:
        only_base = sorted(base_names - finetuned_names)
        only_finetuned = sorted(finetuned_names - base_names)
        raise CompressError(
            f"base and fine-tune contain different tensors (only in base: {only_base[:5]!r}, only in fine-tune: "
            f"{only_finetuned[:5]!r}); they must share one architecture"
        )
    for name in sorted(base_names):
        base_shape = base_checkpoint.shape(name)
        finetuned_shape = finetuned_checkpoint.shape(name)
        if base_shape != finetuned_shape:
            raise CompressError(
                f"tensor {name!r} has shape {base_shape} in the base but {finetuned_shape} in the fine-tune "
                "(a resized vocabulary?); deltamux needs the fine-tune to keep every base shape"
            )
    return base_checkpoint, finetuned_checkpoint


def _untied_names(names: Sequence[str], *, tied: bool) -> list[str]:
    if not tied:
        return list(names)
    return [name for name in names if name not in TIED_OUTPUT_NAMES]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def plan_tensors(checkpoint: Checkpoint, options: CompressOptions) -> TensorPlan:
    """Sort the tensors of `checkpoint` into pruned and other tensors according to `options`."""
    tied = [name for name in checkpoint.names if checkpoint.tied_embeddings and name in TIED_OUTPUT_NAMES]
    pruned, other = [], []
    for name in _untied_names(checkpoint.names, tied=checkpoint.tied_embeddings):
        prunable = len(checkpoint.shape(name)) == 2 and checkpoint.dtype(name).is_floating_point
        if prunable and _matches(name, options.pruned_patterns) and not _matches(name, options.exclude):
            pruned.append(name)
        else:
            other.append(name)
    if not pruned:
        logger.warning("no tensor matches the pruned patterns %s; every changed tensor is an other tensor", options.pruned_patterns)
    return TensorPlan(pruned=pruned, other=other, tied=tied)


# ---------------------------------------------------------------------------------------------
# Streaming deltas


@dataclass(frozen=True)
class TensorDelta:
    """One changed tensor's float32 delta and whether the plan prunes it."""

    name: str
    delta: torch.Tensor
    pruned: bool


def iter_deltas(
    base_checkpoint: Checkpoint,
    finetuned_checkpoint: Checkpoint,
    plan: TensorPlan,
    *,
    other_tensors: str,
    description: str = "compress",
) -> Iterator[TensorDelta]:
    """Yield the float32 delta of every changed tensor that the plan keeps, one tensor at a time.

    Raises CompressError on the first fine-tuned tensor with NaN or infinite values, because its
    delta would be meaningless.
    """
    # Dropped tensors are never read, so a NaN in one of them is not reported: it would not reach the delta.
    names = plan.pruned + (plan.other if other_tensors == "exact" else [])
    pruned = set(plan.pruned)
    for name in tqdm(sorted(names), desc=description, unit="tensor", leave=False):
        if isinstance(finetuned_checkpoint, LoraCheckpoint):
            # An adapter's delta is formed directly (scaling * B @ A), never as a difference of two weights.
            delta = finetuned_checkpoint.delta(name)
            if delta is not None:
                yield TensorDelta(name=name, delta=delta, pruned=name in pruned)
            continue
        finetuned_tensor = finetuned_checkpoint.get(name)
        if finetuned_tensor.is_floating_point() and not bool(torch.isfinite(finetuned_tensor).all()):
            bad = int((~torch.isfinite(finetuned_tensor)).sum())
            raise CompressError(
                f"fine-tuned tensor {name!r} in {str(finetuned_checkpoint.folder)!r} contains "
                f"{_plural(bad, 'NaN or infinite value')}; "
                "fix or re-export the fine-tune"
            )
        base_tensor = base_checkpoint.get(name)
        if torch.equal(base_tensor, finetuned_tensor):
            continue

        # Deltas in float32: fine-tuning changes are often below the half-precision step of the weight.
        delta = finetuned_tensor.to(torch.float32) - base_tensor.to(torch.float32)
        del base_tensor, finetuned_tensor
        yield TensorDelta(name=name, delta=delta, pruned=name in pruned)


# ---------------------------------------------------------------------------------------------
# The pipeline


def compress(
    *,
    base: str | Path,
    finetuned: str | Path | None = None,
    task: str,
    store: str | Path,
    method: str,
    drop_rate: float | None = None,
    seed: int = 0,
    q: float | None = None,
    q_select: str | None = None,
    calibration: str | Path | None = None,
    validation: str | Path | None = None,
    other_tensors: str = "exact",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    value_dtype: str = "float16",
    rescale: bool = False,
    device: str = "cpu",
    window_tokens: int = DEFAULT_WINDOW_TOKENS,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    structure: str | None = None,
    eta: float | None = None,
    lora: str | Path | None = None,
    max_loss: float | None = None,
    allow_empty: bool = False,
) -> DeltaMetadata:
    """Compress `finetuned` (or the LoRA adapter folder `lora`) against `base` and write `<store>/<task>.delta.safetensors`.

    With `method="auto"`, the recommender chooses the method, the drop rate (unless given) and the
    q selector, searching with the validation or calibration data if given, within `max_loss` points.

    Raises a ValueError subclass (CompressError, CheckpointError, CalibrationError,
    PruningParameterError) before anything is written when an input is invalid. A delta that
    stores no value is an EmptyDeltaError unless `allow_empty` is set.
    """
    if (finetuned is None) == (lora is None):
        raise CompressError(f"pass exactly one of a fine-tuned checkpoint ({finetuned!r}) or a LoRA adapter folder ({lora!r})")
    notes = None
    if method == AUTO_METHOD:
        validate_task_name(task)
        method, drop_rate, q_select, notes = _recommended(
            base=base, finetuned=finetuned, lora=lora, drop_rate=drop_rate, q=q, q_select=q_select,
            calibration=calibration, validation=validation, max_loss=max_loss, seed=seed, device=device,
            window_tokens=window_tokens, max_windows=max_windows, max_new_tokens=max_new_tokens,
        )
    elif drop_rate is None:
        raise CompressError(f"method {method!r} needs a drop rate; pass one, or use method 'auto' to have it chosen")
    elif max_loss is not None:
        raise CompressError(f"max loss {max_loss!r} applies to method 'auto' only")
    options = CompressOptions(
        task=task,
        method=method,
        drop_rate=drop_rate,
        seed=int(seed),
        q=q,
        q_select=q_select,
        calibration=None if calibration is None else Path(calibration),
        validation=None if validation is None else Path(validation),
        other_tensors=other_tensors,
        include=None if include is None else tuple(include),
        exclude=tuple(exclude or ()),
        value_dtype=value_dtype,
        rescale=rescale,
        device=device,
        window_tokens=window_tokens,
        max_windows=max_windows,
        max_new_tokens=max_new_tokens,
        structure=structure,
        eta=eta,
        allow_empty=allow_empty,
    )
    return run_compression(
        base=Path(base),
        finetuned=None if finetuned is None else Path(finetuned),
        store=Path(store),
        options=options,
        lora=None if lora is None else Path(lora),
        notes=notes,
    )


def _recommended(*, drop_rate, q, q_select, max_loss, **inputs) -> tuple[str, float, str | None, dict]:
    """Resolve method 'auto' through the recommender; return (method, drop rate, q selector, notes for the file)."""
    from deltastore.recommend import DEFAULT_MAX_LOSS, recommend

    if q is not None or q_select is not None:
        raise CompressError("method 'auto' chooses q itself; leave out q and the q selector")
    recommendation = recommend(
        **inputs, fixed_drop_rate=drop_rate, max_loss=DEFAULT_MAX_LOSS if max_loss is None else max_loss
    )
    logger.info("method auto: %s at drop rate %g (%s)", recommendation.method, recommendation.drop_rate, "; ".join(recommendation.reasons))
    notes = {
        "recommendation": {
            "method": recommendation.method,
            "drop_rate": recommendation.drop_rate,
            "q_select": recommendation.q_select,
            "expected_quality": recommendation.expected_quality,
            "reasons": recommendation.reasons,
        }
    }
    return recommendation.method, recommendation.drop_rate, recommendation.q_select, notes


def run_compression(
    *,
    base: Path,
    finetuned: Path | None,
    store: Path,
    options: CompressOptions,
    lora: Path | None = None,
    notes: dict | None = None,
) -> DeltaMetadata:
    """Run a compression described by a checked `CompressOptions` record, of a fine-tune or a LoRA adapter."""
    from deltastore import qselect

    # 1. Read the small inputs first, so a bad file fails before any heavy work.
    calibration_texts = read_calibration(options.calibration) if options.calibration else None
    validation_samples = read_validation(options.validation) if options.validation else None
    if store.exists() and not store.is_dir():
        raise CompressError(f"store path {str(store)!r} is a file; pass a folder for delta files")

    # 2. Check that the two checkpoints fit together and decide what happens to each tensor.
    if lora is not None:
        base_checkpoint, finetuned_checkpoint = open_lora_pair(base, lora)
        _check_lora_targets(finetuned_checkpoint)
    else:
        base_checkpoint, finetuned_checkpoint = open_pair(base, finetuned)
    plan = plan_tensors(base_checkpoint, options)
    base_fingerprint = fingerprint(base)
    logger.info(
        "compressing %s against %s: %s, %s (%s), method %s, drop rate %s",
        finetuned or lora, base, _plural(len(plan.pruned), "pruned tensor"), _plural(len(plan.other), "other tensor"),
        options.other_tensors, options.method, options.drop_rate,
    )

    # 3. WANDA needs the input feature norms of every linear layer over the calibration text.
    input_norms: dict[str, torch.Tensor] = {}
    if methods.get_method(options.method).needs_input_norms:
        input_norms = finetuned_input_norms(finetuned_checkpoint, calibration_texts, options=options)

    # 4. Prune, choosing q first when asked to.
    selection = None
    if options.q_select is not None:
        selection = qselect.select_q(
            selector=options.q_select,
            base_checkpoint=base_checkpoint,
            finetuned_checkpoint=finetuned_checkpoint,
            plan=plan,
            drop_rate=options.drop_rate,
            seed=options.seed,
            other_tensors=options.other_tensors,
            calibration_texts=calibration_texts,
            validation_samples=validation_samples,
            device=options.device,
            settings=qselect.QSearchSettings(
                window_tokens=options.window_tokens,
                max_windows=options.max_windows,
                max_new_tokens=options.max_new_tokens,
            ),
            structure=options.structure,
            eta=options.eta,
        )
        entries = selection.entries
        q = None if selection.layer_q is not None else selection.q
    else:
        q = options.q
        entries = prune_entries(base_checkpoint, finetuned_checkpoint, plan, options, input_norms)
    _check_not_empty(entries, options=options, finetuned=finetuned or lora, base=base)
    effective = _effective_drop_rate(entries, options)

    # 5. Write the file atomically, with everything a reader needs to trust and inspect it.
    params = {
        "method": options.method,
        "drop_rate": options.drop_rate,
        "q": q,
        "seed": options.seed,
        "structure": options.structure,
        "q_select": options.q_select,
        "rescale": options.rescale,
        "other_tensors": options.other_tensors,
        "include": None if options.include is None else list(options.include),
        "exclude": list(options.exclude),
    }
    if effective is not None:
        params["effective_drop_rate"] = effective
    if selection is not None:
        params["q_search"] = selection.summary()
        if selection.layer_q is not None:
            params["q_layers"] = selection.layer_q
            params["eta"] = selection.eta
    extra = {
        "source": "lora" if lora is not None else "finetuned",
        "base_numel": base_checkpoint.numel(),
        "base_nbytes": base_checkpoint.nbytes(),
        "pruned_tensors": sum(1 for name in entries if not isinstance(entries[name], DenseEntry)),
        "dense_tensors": sum(1 for name in entries if isinstance(entries[name], DenseEntry)),
        "pruned_numel": sum(math.prod(base_checkpoint.shape(name)) for name in plan.pruned),
        **(notes or {}),
    }
    path = store / delta_file_name(options.task)
    metadata = write_delta(
        path,
        task=options.task,
        base_fingerprint=base_fingerprint,
        method=options.method,
        params=params,
        entries=entries,
        value_dtype=options.value_dtype,
        extra=extra,
    )
    logger.info("wrote %s: %s, nnz %d, %d bytes", path, _plural(len(metadata.tensors), "tensor"), metadata.nnz, metadata.nbytes)
    return metadata


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun if count == 1 else noun + 's'}"


def _check_not_empty(entries: dict[str, Entry], *, options: CompressOptions, finetuned: Path, base: Path) -> None:
    """Raise EmptyDeltaError when the delta stores no value, unless the options allow it."""
    stored = sum(entry.values.numel() for entry in entries.values())
    if stored > 0:
        return
    if not entries:
        problem = (
            f"the fine-tune {str(finetuned)!r} equals the base {str(base)!r}: no tensor that the delta keeps "
            "differs, so there is nothing to store"
        )
        fix = "check that --finetuned names the fine-tuned checkpoint, not a copy of the base"
        if options.other_tensors == "drop" or options.include is not None:
            problem += f" (other tensors: {options.other_tensors}, pruned patterns: {', '.join(options.pruned_patterns)})"
            fix += ", or widen --include or use --other-tensors exact"
    else:
        problem = (
            f"every delta value was dropped at drop rate {options.drop_rate:g} ({_plural(len(entries), 'changed tensor')}, "
            "0 stored values), so the file would change nothing"
        )
        fix = "lower --drop-rate"
    if options.allow_empty:
        logger.warning("%s; writing the empty delta because allow_empty is set", problem)
        return
    raise EmptyDeltaError(f"{problem}; {fix}, or pass --allow-empty to write the empty delta anyway")


def _effective_drop_rate(entries: dict[str, Entry], options: CompressOptions) -> float | None:
    """Return the share of pruned entries the method dropped, and warn when rounding moved it.

    Methods that keep a whole number of entries per tensor or per row (magnitude, WANDA) drop
    another share than requested once that number is rounded. Random methods return None.
    """
    # NOTE: structured pruning (rows, columns) rounds the kept line count too, but is not counted here.
    if options.structure is not None:
        return None
    shapes = [entry.shape for entry in entries.values() if not isinstance(entry, DenseEntry)]
    effective = methods.effective_drop_rate(options.method, shapes, options.drop_rate)
    if effective is None:
        return None
    requested_kept, effective_kept = 1.0 - options.drop_rate, 1.0 - effective
    if abs(effective_kept - requested_kept) > EFFECTIVE_KEPT_TOLERANCE * requested_kept:
        logger.warning(
            "%s keeps a whole number of entries per %s, so it drops %.6g of the pruned entries, not the "
            "requested %.6g (it keeps %.3gx as many); the file records both",
            options.method, "output row" if options.method == "wanda" else "tensor", effective, options.drop_rate,
            effective_kept / requested_kept if requested_kept else float("inf"),
        )
    return effective


def _check_lora_targets(checkpoint: LoraCheckpoint) -> None:
    tied = [name for name in checkpoint.adapter.modules if checkpoint.tied_embeddings and name in TIED_OUTPUT_NAMES]
    if tied:
        raise CompressError(
            f"adapter {str(checkpoint.folder)!r} targets {tied!r}, which the base ties to its input embedding; "
            "a delta of a tied output embedding would change the input embedding too"
        )


def prune_entries(
    base_checkpoint: Checkpoint,
    finetuned_checkpoint: Checkpoint,
    plan: TensorPlan,
    options: CompressOptions,
    input_norms: dict[str, torch.Tensor],
) -> dict[str, Entry]:
    """Prune every planned tensor with `options.method` at a given q (no q search)."""
    entries: dict[str, Entry] = {}
    for item in iter_deltas(base_checkpoint, finetuned_checkpoint, plan, other_tensors=options.other_tensors):
        if not item.pruned:
            entries[item.name] = DenseEntry(shape=tuple(item.delta.shape), values=item.delta)
            continue
        prune_options = methods.PruneOptions(
            drop_rate=options.drop_rate,
            seed=options.seed,
            q=options.q,
            rescale=options.rescale,
            input_norms=input_norms.get(item.name),
            structure=options.structure,
        )
        entries[item.name] = methods.prune(item.delta, method=options.method, name=item.name, options=prune_options)
        del item
    return entries


def load_finetuned_model(finetuned_checkpoint, *, device: str = "cpu"):
    """Load the fine-tuned model in float32 with its tokenizer: from its folder, or base plus adapter."""
    from deltastore.scoring import load_causal_lm

    loader = getattr(finetuned_checkpoint, "load_model", None)
    if loader is not None:
        return loader(device=device)
    return load_causal_lm(finetuned_checkpoint.folder, device=device)


def finetuned_input_norms(finetuned_checkpoint, texts: list[str], *, options: CompressOptions) -> dict[str, torch.Tensor]:
    """Return WANDA's input feature norms of every linear layer of the fine-tuned model."""
    from deltastore.calibration import collect_input_norms, token_windows

    model, tokenizer = load_finetuned_model(finetuned_checkpoint, device=options.device)
    windows = token_windows(tokenizer, texts, window_tokens=options.window_tokens, max_windows=options.max_windows)
    norms = collect_input_norms(model, windows)
    del model
    return norms
