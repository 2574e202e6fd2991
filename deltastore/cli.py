"""Offline `deltamux` subcommands: compress, recommend, inspect, verify, reconstruct, evaluate.

`add_commands` registers them on the subparsers of the `deltamux` parser. Every command returns
its exit code: 0 on success, 1 when `verify` finds a bad file, and 2 on invalid input, after one
line on stderr that names what failed and what to do. Heavy modules are imported when a command
runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_INVALID_INPUT = 2

# Names of methods.METHODS and qselect.Q_SELECTORS, repeated here so that building the parser does
# not import torch; a test checks that they match the registries.
METHOD_NAMES = ("dare", "darex-q", "magnitude", "wanda")
Q_SELECTOR_NAMES = ("validation", "output-change", "per-layer")

# The bf16 checkpoint that compression ratios are measured against stores 2 bytes per weight.
BF16_BYTES = 2


def _reports_errors(command: str) -> Callable:
    """Turn the ValueError and OSError of a command into one stderr line and exit code 2."""

    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def wrapper(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except (ValueError, OSError) as e:
                logger.debug("deltamux %s failed", command, exc_info=True)
                print(f"deltamux {command}: error: {e}", file=sys.stderr)
                return EXIT_INVALID_INPUT

        return wrapper

    return decorate


def _bf16_ratio(metadata) -> tuple[float | None, int | None]:
    """Return (delta bytes / bf16 checkpoint bytes, bf16 bytes), or (None, None) without `base_numel`."""
    numel = metadata.extra.get("base_numel")
    if not isinstance(numel, int) or numel <= 0:
        return None, None
    reference = BF16_BYTES * numel
    return metadata.nbytes / reference, reference


def _plural(count: int, noun: str, plural_form: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def _format_q(value) -> str:
    return "-" if value is None else f"{value:g}"


def _drop_rate_text(params: dict) -> str:
    """Return the requested drop rate, with the effective one when rounding moved it."""
    requested = _format_q(params.get("drop_rate"))
    effective = params.get("effective_drop_rate")
    if effective is None or f"{effective:.4g}" == f"{params.get('drop_rate'):.4g}":
        return requested
    return f"{requested} (effective {effective:.6g})"


def natural_key(name: str) -> list:
    """Return a sort key that orders digit runs by value: layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------
# compress


@_reports_errors("compress")
def run_compress(args: argparse.Namespace) -> int:
    from deltastore.compress import compress
    from deltastore.format import delta_file_name

    metadata = compress(
        base=args.base,
        finetuned=args.finetuned,
        lora=args.lora,
        task=args.task,
        store=args.store,
        method=args.method,
        drop_rate=args.drop_rate,
        seed=args.seed,
        q=args.q,
        q_select=args.q_select,
        calibration=args.calibration,
        validation=args.validation,
        other_tensors=args.other_tensors,
        include=args.include,
        exclude=args.exclude,
        value_dtype=args.value_dtype,
        rescale=args.rescale,
        device=args.device,
        window_tokens=args.window_tokens,
        max_windows=args.max_windows,
        max_new_tokens=args.max_new_tokens,
        structure=args.structure,
        eta=args.eta,
        max_loss=args.max_loss,
        allow_empty=args.allow_empty,
    )
    recommendation = metadata.extra.get("recommendation")
    if recommendation:
        print(f"method auto chose {recommendation['method']} at drop rate {recommendation['drop_rate']:g}:")
        for reason in recommendation["reasons"]:
            print(f"  - {reason}")
    search = metadata.params.get("q_search")
    if search and search["trace"]:
        parameter = search.get("parameter", "q")
        chosen = search.get(parameter, search["q"])
        print(f"{parameter} search ({search['selector']}, {search['metric']}), in evaluation order:")
        print(f"  {parameter:>10}  {'score':>14}")
        for value, score in search["trace"]:
            marker = "  <- chosen" if value == chosen else ""
            print(f"  {value:>10.6f}  {score:>14.6g}{marker}")
    layer_q = metadata.params.get("q_layers")
    if layer_q:
        print(f"per-layer q (eta {metadata.params['eta']:g}): {min(layer_q.values()):.4f} to {max(layer_q.values()):.4f} "
              f"over {_plural(len(layer_q), 'tensor')}; `deltamux inspect` lists them")
    ratio, _ = _bf16_ratio(metadata)
    ratio_text = "" if ratio is None else f", {ratio:.4f} of the bf16 checkpoint"
    print(
        f"wrote {Path(args.store) / delta_file_name(metadata.task)}: method {metadata.method}, drop rate "
        f"{_drop_rate_text(metadata.params)}, q {_format_q(metadata.params.get('q'))}, nnz {metadata.nnz}, "
        f"{metadata.nbytes} bytes{ratio_text}"
    )
    return EXIT_OK


def _add_compress(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="prune a fine-tune's delta against its base and write TASK.delta.safetensors",
        description=(
            "Compute the delta (fine-tune minus base, in float32) tensor by tensor, prune the attention and MLP "
            "linear weights with METHOD, and write STORE/TASK.delta.safetensors atomically."
        ),
    )
    parser.add_argument("--base", required=True, type=Path, metavar="DIR", help="base checkpoint folder (Hugging Face layout, *.safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--finetuned", type=Path, metavar="DIR", help="fine-tuned checkpoint folder of the same architecture")
    source.add_argument(
        "--lora",
        type=Path,
        metavar="DIR",
        help="PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) of the base: the delta is "
        "lora_alpha / r * B @ A per target module (lora_alpha / sqrt(r) with use_rslora)",
    )
    parser.add_argument("--task", required=True, metavar="NAME", help="task name: 1 to 64 letters, digits, '.', '_' or '-'; names the file")
    parser.add_argument("--store", required=True, type=Path, metavar="DIR", help="folder for delta files; created if missing")
    parser.add_argument(
        "--method",
        required=True,
        choices=(*METHOD_NAMES, "auto"),
        help="pruning method; auto runs `deltamux recommend` and uses its method, drop rate and q selector",
    )

    parser.add_argument(
        "--drop-rate",
        type=float,
        metavar="P",
        help="drop rate: the fraction of delta entries set to zero, in [0, 1); 0.99 keeps 1 %%; "
        "required unless --method auto, which otherwise chooses it",
    )
    parser.add_argument(
        "--max-loss",
        type=float,
        metavar="POINTS",
        help="--method auto: largest quality loss accepted, in points (see `deltamux recommend --help`) (default: 1)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random masks (dare, darex-q) (default: 0)")

    q_group = parser.add_mutually_exclusive_group()
    q_group.add_argument(
        "--q", type=float, default=None, help="darex-q rescale: kept values are divided by Q, Q in [1 - P, 1]; Q = 1 - P is DARE"
    )
    q_group.add_argument(
        "--q-select",
        choices=Q_SELECTOR_NAMES,
        default=None,
        help=(
            "darex-q: choose Q by a search, on --validation accuracy or on top-5 logit MSE over --calibration text; "
            "per-layer: one Q per linear layer from --calibration activations, eta tuned by --validation accuracy "
            "if given, else by top-5 logit MSE"
        ),
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=None,
        help="--q-select per-layer: use this eta instead of searching 0.1 to 0.7 (default: search)",
    )

    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="unlabelled text, one sample per line or JSONL with 'text' (wanda and --q-select output-change)",
    )
    parser.add_argument(
        "--validation",
        type=Path,
        metavar="FILE",
        help="labelled JSONL with 'prompt', 'completion' and optional 'answer' (--q-select validation)",
    )

    parser.add_argument(
        "--other-tensors",
        choices=("exact", "drop"),
        default="exact",
        help="changed tensors that are not pruned (norms, biases, embeddings): store exactly or drop (default: exact)",
    )
    parser.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="prune only tensors whose name matches GLOB; repeatable (default: attention and MLP linear weights)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="never prune tensors matching GLOB; they follow --other-tensors; repeatable (default: none)",
    )

    parser.add_argument(
        "--value-dtype",
        choices=("float16", "bfloat16", "float32", "int8"),
        default="float16",
        help=(
            "dtype of stored pruned values: 2 bytes (float16, bfloat16), 4 bytes (float32), or 1 byte (int8, with one "
            "float32 scale per 1024 values) each (default: float16)"
        ),
    )
    parser.add_argument(
        "--rescale", action="store_true", help="magnitude and wanda: multiply kept values by 1 / (1 - P) (default: off)"
    )
    parser.add_argument(
        "--structure",
        choices=("rows", "columns"),
        default=None,
        help=(
            "keep or drop whole rows (output features) or columns (input features) of each pruned weight: "
            "at random for dare and darex-q, by L2 norm for magnitude and wanda (default: single entries)"
        ),
    )
    parser.add_argument(
        "--allow-empty",
        action="store_true",
        help="write the delta even when it stores no value, because the fine-tune equals the base or every value "
        "was dropped; without it such a compression fails with exit code 2 (default: off)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for calibration and q search models (default: cpu)")
    parser.add_argument(
        "--window-tokens", type=int, default=256, help="tokens per calibration window (q search, wanda) (default: 256)"
    )
    parser.add_argument(
        "--max-windows", type=int, default=64, help="maximum number of calibration windows (q search, wanda) (default: 64)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="maximum tokens generated per validation sample (--q-select validation) (default: 64)",
    )
    parser.set_defaults(func=run_compress)


# ---------------------------------------------------------------------------------------------
# inspect


def inspect_record(metadata) -> dict:
    """Return the JSON record `inspect --json` prints: the metadata plus bytes and ratio figures."""
    ratio, reference = _bf16_ratio(metadata)
    return {
        **metadata.to_json(), "nnz": metadata.nnz, "nbytes": metadata.nbytes, "bf16_nbytes": reference,
        "ratio_to_bf16": ratio, "checksum_verified": True,
    }


@_reports_errors("inspect")
def run_inspect(args: argparse.Namespace) -> int:
    from deltastore.format import DeltaFormatError, read_delta, read_metadata

    # 1. The header: a file that is no delta file is invalid input (exit 2).
    metadata = read_metadata(args.file)

    # 2. The full read verifies the checksum and every array: a damaged payload fails (exit 1).
    try:
        read_delta(args.file)
    except DeltaFormatError as e:
        print(f"deltamux inspect: FAILED: {e}; the file is damaged, so compress it again or copy it anew", file=sys.stderr)
        return EXIT_VERIFY_FAILED

    if args.json:
        print(json.dumps(inspect_record(metadata), indent=2, sort_keys=True))
        return EXIT_OK

    params = metadata.params
    ratio, reference = _bf16_ratio(metadata)
    ratio_text = "unknown (the file does not record the base size)" if ratio is None else f"{ratio:.4f} (payload bytes / {reference} bf16 bytes)"
    rows = [
        ("task", metadata.task),
        ("method", metadata.method),
        ("drop rate", _drop_rate_text(params)),
        ("q", _format_q(params.get("q"))),
        ("seed", str(params.get("seed", "-"))),
        ("nnz", str(metadata.nnz)),
        ("bytes", str(metadata.nbytes)),
        ("ratio to bf16", ratio_text),
        ("base fingerprint", metadata.base_fingerprint),
        ("format version", str(metadata.format_version)),
        ("created", metadata.created),
        ("checksum", "OK (payload_sha256 matches the arrays; `deltamux verify --base` also checks the base)"),
    ]
    if params.get("structure"):
        rows.append(("structure", str(params["structure"])))
    search = params.get("q_search")
    if search:
        score = "-" if search["score"] is None else f"{search['score']:.6g}"
        rows.append(("q search", f"{search['selector']}: {search['metric']} {score} over {_plural(len(search['trace']), 'candidate')}"))
    layer_q = params.get("q_layers") or {}
    if layer_q:
        rows.append(("eta", _format_q(params.get("eta"))))
        rows.append(("per-layer q", f"{min(layer_q.values()):.4f} to {max(layer_q.values()):.4f} over {_plural(len(layer_q), 'tensor')}"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")

    print()
    name_width = max([len("tensor")] + [len(name) for name in metadata.tensors])
    q_column = f"  {'q':>7}" if layer_q else ""
    print(f"{'tensor':<{name_width}}  {'kind':<7}  {'shape':<14}  {'nnz':>10}  {'kept':>7}  {'values':<8}  {'bytes':>10}{q_column}")
    for name in sorted(metadata.tensors, key=natural_key):
        info = metadata.tensors[name]
        kept = info.nnz / info.numel if info.numel else 0.0
        shape = "x".join(str(size) for size in info.shape) or "scalar"
        q_value = ""
        if name in layer_q:
            q_value = f"  {layer_q[name]:>7.4f}"
        elif layer_q:
            q_value = f"  {'-':>7}"
        print(
            f"{name:<{name_width}}  {info.kind:<7}  {shape:<14}  {info.nnz:>10}  {kept:>7.2%}  {info.value_dtype:<8}  {info.nbytes:>10}{q_value}"
        )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# recommend


@_reports_errors("recommend")
def run_recommend(args: argparse.Namespace) -> int:
    from deltastore.recommend import recommend

    drop_rates = tuple(float(value) for value in args.drop_rates.split(",") if value.strip())
    recommendation = recommend(
        base=args.base,
        finetuned=args.finetuned,
        lora=args.lora,
        validation=args.validation,
        calibration=args.calibration,
        max_loss=args.max_loss,
        drop_rates=drop_rates,
        seed=args.seed,
        device=args.device,
        window_tokens=args.window_tokens,
        max_windows=args.max_windows,
        max_new_tokens=args.max_new_tokens,
    )
    if args.json:
        print(json.dumps(recommendation.to_json(), indent=2, sort_keys=True))
        return EXIT_OK

    stats = recommendation.stats
    print(f"delta statistics over {_plural(len(stats.layers), 'pruned tensor')} ({_plural(stats.pruned_numel, 'entry', 'entries')}): "
          f"mean |delta| {stats.mean_abs:.4g}")
    name_width = max([len("tensor")] + [len(layer.name) for layer in stats.layers])
    print(f"  {'tensor':<{name_width}}  {'mean |delta|':>12}  {'std |delta|':>12}")
    for layer in stats.layers:
        print(f"  {layer.name:<{name_width}}  {layer.mean_abs:>12.4g}  {layer.std_abs:>12.4g}")
    if recommendation.candidates:
        print(f"\nsearch ({recommendation.metric}; loss in points against the fine-tune):")
        print(f"  {'method':<10}  {'drop rate':>9}  {'q':>8}  {'score':>12}  {'loss':>8}  {'bytes':>12}")
        for c in recommendation.candidates:
            print(f"  {c.method:<10}  {c.drop_rate:>9g}  {_format_q(c.q):>8}  {c.score:>12.6g}  {c.loss:>8.3g}  {c.nbytes:>12}")

    source = ["--finetuned", str(args.finetuned)] if args.finetuned else ["--lora", str(args.lora)]
    ratio = recommendation.expected_nbytes / (BF16_BYTES * stats.base_numel) if stats.base_numel else None
    ratio_text = "" if ratio is None else f" ({ratio:.4f} of the bf16 checkpoint)"
    print(f"\nrecommended: {recommendation.method} at drop rate {recommendation.drop_rate:g}"
          + (f", q chosen by {recommendation.q_select}" if recommendation.q_select else ""))
    print(f"  command:  {recommendation.command(base=args.base, source=source, calibration=args.calibration, validation=args.validation)}")
    print(f"  expected size:    {recommendation.expected_nbytes} bytes{ratio_text}")
    print(f"  expected quality: {recommendation.expected_quality}")
    print("  why:")
    for reason in recommendation.reasons:
        print(f"    - {reason}")
    return EXIT_OK


def _add_recommend(subparsers) -> None:
    parser = subparsers.add_parser(
        "recommend",
        help="recommend a pruning method and drop rate for a fine-tune, with the command line to run",
        description=(
            "Read |delta| statistics per pruned tensor and apply the DAREx selection pipeline: magnitude or WANDA for "
            "large deltas (mean |delta| above 0.005), DARE or DAREx-q for small ones. With --validation or "
            "--calibration, score the chosen family at each drop rate and pick the highest drop rate whose loss stays "
            "within --max-loss points."
        ),
    )
    parser.add_argument("--base", required=True, type=Path, metavar="DIR", help="base checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--finetuned", type=Path, metavar="DIR", help="fine-tuned checkpoint folder")
    source.add_argument("--lora", type=Path, metavar="DIR", help="PEFT LoRA adapter folder of the base")
    parser.add_argument(
        "--validation", type=Path, metavar="FILE", help="labelled JSONL with 'prompt', 'completion', optional 'answer'"
    )
    parser.add_argument("--calibration", type=Path, metavar="FILE", help="unlabelled text, one sample per line or JSONL with 'text'")
    parser.add_argument(
        "--max-loss",
        type=float,
        default=1.0,
        metavar="POINTS",
        help=(
            "largest accepted quality loss: exact-match accuracy points below the fine-tune with --validation, else "
            "the percentage of the base's top-5 logit MSE to the fine-tune that remains (default: 1)"
        ),
    )
    parser.add_argument(
        "--drop-rates", default="0.5,0.7,0.9,0.95,0.99", metavar="LIST",
        help="comma-separated drop rates to search (default: 0.5,0.7,0.9,0.95,0.99)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random masks (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device for the models (default: cpu)")
    parser.add_argument("--window-tokens", type=int, default=256, help="tokens per calibration window (default: 256)")
    parser.add_argument("--max-windows", type=int, default=64, help="maximum number of calibration windows (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="maximum tokens generated per validation sample (default: 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")
    parser.set_defaults(func=run_recommend)


def _add_inspect(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a delta file's method, drop rate, q, seed, nnz, bytes and tensors, after checking its checksum",
        description=(
            "Verify the payload checksum and every array, then print what the header records, tensors in layer order. "
            "Exit 0 if the file is intact, 1 if its payload is damaged, 2 if it is no delta file. The base "
            "fingerprint is not checked (use verify --base)."
        ),
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="a TASK.delta.safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table (default: table)")
    parser.set_defaults(func=run_inspect)


# ---------------------------------------------------------------------------------------------
# verify


@_reports_errors("verify")
def run_verify(args: argparse.Namespace) -> int:
    from deltastore.checkpoint import fingerprint
    from deltastore.format import DeltaFormatError, read_delta

    for path in args.files:
        if not path.is_file():
            raise ValueError(f"delta file {str(path)!r} not found; pass TASK.delta.safetensors files")
    expected = fingerprint(args.base)
    failed = 0
    # Every file is checked, so one run reports all bad files of a store, not only the first.
    for path in args.files:
        try:
            delta = read_delta(path, expected_fingerprint=expected)
        except DeltaFormatError as e:
            print(f"deltamux verify: FAILED: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: OK (checksum matches, made for base {expected}, {_plural(len(delta.entries), 'tensor')}, nnz {delta.metadata.nnz})")
    return EXIT_VERIFY_FAILED if failed else EXIT_OK


def _add_verify(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check a delta file's checksum and that it was made for a base",
        description="Verify each file's payload checksum and base fingerprint. Exit 0 if all match, 1 if any "
        "does not, 2 on invalid input.",
    )
    parser.add_argument("files", type=Path, nargs="+", metavar="FILE", help="one or more TASK.delta.safetensors files")
    parser.add_argument("--base", required=True, type=Path, metavar="DIR", help="the base checkpoint folder the delta must fit")
    parser.set_defaults(func=run_verify)


# ---------------------------------------------------------------------------------------------
# reconstruct


@_reports_errors("reconstruct")
def run_reconstruct(args: argparse.Namespace) -> int:
    from deltastore.reconstruct import reconstruct

    out = reconstruct(args.file, args.base, args.out)
    print(f"wrote {out}: base {args.base} plus {args.file}")
    return EXIT_OK


def _add_reconstruct(subparsers) -> None:
    parser = subparsers.add_parser(
        "reconstruct",
        help="write base plus delta as a full Hugging Face folder",
        description=(
            "Verify the delta against the base, then write OUT with the base's config and tokenizer files and a "
            "model.safetensors of base plus delta, in the base's dtype."
        ),
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="a TASK.delta.safetensors file")
    parser.add_argument("--base", required=True, type=Path, metavar="DIR", help="the base checkpoint folder")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder; must not exist or be empty")
    parser.set_defaults(func=run_reconstruct)


# ---------------------------------------------------------------------------------------------
# evaluate


def _format_score(score) -> str:
    return "-" if score is None else f"{score.accuracy:.4f} ({score.correct}/{score.total})"


@_reports_errors("evaluate")
def run_evaluate(args: argparse.Namespace) -> int:
    from deltastore.evaluate import evaluate

    result = evaluate(
        args.file,
        base=args.base,
        finetuned=args.finetuned,
        calibration=args.calibration,
        validation=args.validation,
        device=args.device,
        window_tokens=args.window_tokens,
        max_windows=args.max_windows,
        max_new_tokens=args.max_new_tokens,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
        return EXIT_OK
    print(f"task {result.task}: method {result.method}, drop rate {_format_q(result.params.get('drop_rate'))}, "
          f"q {_format_q(result.params.get('q'))}, nnz {result.nnz}")
    if result.output_change_pruned is not None:
        print(f"top-5 logit MSE against the fine-tune over {result.windows} windows:")
        print(f"  base + delta  {result.output_change_pruned:.6g}")
        print(f"  base alone    {result.output_change_base:.6g}")
    if result.score_pruned is not None:
        print("exact-match accuracy on the validation file:")
        print(f"  base          {_format_score(result.score_base)}")
        print(f"  fine-tune     {_format_score(result.score_finetuned)}")
        print(f"  base + delta  {_format_score(result.score_pruned)}")
    return EXIT_OK


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure base plus delta against the fine-tune (output change, accuracy)",
        description=(
            "Output change: top-5 logit MSE of base + delta against the fine-tuned model over --calibration text. "
            "With --validation: exact-match accuracy of the base, the fine-tune and base + delta. Needs at least one."
        ),
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="a TASK.delta.safetensors file")
    parser.add_argument("--base", required=True, type=Path, metavar="DIR", help="the base checkpoint folder")
    parser.add_argument("--finetuned", required=True, type=Path, metavar="DIR", help="the fine-tuned checkpoint folder")
    parser.add_argument("--calibration", type=Path, metavar="FILE", help="unlabelled text, one sample per line or JSONL with 'text'")
    parser.add_argument("--validation", type=Path, metavar="FILE", help="labelled JSONL with 'prompt', 'completion', optional 'answer'")
    parser.add_argument("--window-tokens", type=int, default=256, help="tokens per calibration window (default: 256)")
    parser.add_argument("--max-windows", type=int, default=64, help="maximum number of calibration windows (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="maximum tokens generated per validation sample (default: 64)")
    parser.add_argument("--device", default="cpu", help="torch device for the models (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")
    parser.set_defaults(func=run_evaluate)


def add_commands(subparsers) -> None:
    """Register compress, recommend, inspect, verify, reconstruct and evaluate on `subparsers`."""
    _add_compress(subparsers)
    _add_recommend(subparsers)
    _add_inspect(subparsers)
    _add_verify(subparsers)
    _add_reconstruct(subparsers)
    _add_evaluate(subparsers)
