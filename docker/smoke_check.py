"""Host-side checks for docker/smoke-test.sh, run with the project's virtual environment.

    python docker/smoke_check.py complete --url http://127.0.0.1:PORT/v1 --tasks sentiment,arithmetic
        Check that /v1/models lists every task, then send one chat completion per task through the
        `openai` client. Exit 1 when a task is missing or a reply is empty.

    python docker/smoke_check.py rebase-delta SRC DST --fingerprint sha256:HEX
        Write a copy of the delta file SRC whose header names another base, with a valid checksum,
        so the server's and `deltamux verify`'s fingerprint check (not the checksum) must reject it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openai import OpenAI

logger = logging.getLogger(__name__)

PROMPT = "Say hello in three words."


def run_complete(args: argparse.Namespace) -> int:
    """Send one chat completion per task and return 0 when every reply contains text."""
    from openai import APIError, OpenAI

    client = OpenAI(base_url=args.url, api_key=args.api_key, timeout=args.timeout, max_retries=0)
    tasks = [task for task in args.tasks.split(",") if task]
    try:
        return _complete_each(client, tasks, max_tokens=args.max_tokens)
    except APIError as e:
        logger.error("request to %s failed: %s: %s", args.url, type(e).__name__, e)
        return 1


def _complete_each(client: OpenAI, tasks: list[str], *, max_tokens: int) -> int:
    served = {model.id for model in client.models.list().data}
    missing = sorted(set(tasks) - served)
    if missing:
        logger.error("tasks %s are missing from /v1/models, which lists %s", missing, sorted(served))
        return 1

    for task in tasks:
        reply = client.chat.completions.create(
            model=task, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=max_tokens
        )
        text = reply.choices[0].message.content or ""
        logger.info("task %s: model %s, %d completion tokens, reply %r", task, reply.model, reply.usage.completion_tokens, text)
        if reply.model != task:
            logger.error("task %s: the reply names model %r", task, reply.model)
            return 1
        if not text.strip():
            logger.error("task %s: the reply is empty", task)
            return 1
    return 0


def run_rebase_delta(args: argparse.Namespace) -> int:
    """Copy a delta file with another base fingerprint in its header and return 0."""
    from deltastore.format import read_delta, write_delta

    source = read_delta(args.source)
    metadata = source.metadata
    if metadata.base_fingerprint == args.fingerprint:
        raise ValueError(f"{str(args.source)!r} was already made for base {args.fingerprint!r}; pass a different --fingerprint")
    value_dtypes = {info.value_dtype for info in metadata.tensors.values()}
    # One dtype for all entries is what `deltamux compress` writes; float32 keeps mixed files exact.
    value_dtype = value_dtypes.pop() if len(value_dtypes) == 1 else "float32"

    written = write_delta(
        args.destination, task=metadata.task, base_fingerprint=args.fingerprint, method=metadata.method,
        params=metadata.params, entries=source.entries, value_dtype=value_dtype, extra=metadata.extra,
    )
    logger.info("wrote %s: task %s, made for base %s", args.destination, written.task, written.base_fingerprint)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Host-side checks for the deltamux container smoke test.")
    commands = parser.add_subparsers(dest="command", required=True)

    complete = commands.add_parser("complete", help="send one chat completion per task through the openai client")
    complete.add_argument("--url", required=True, help="the API base URL, for example http://127.0.0.1:8000/v1")
    complete.add_argument("--tasks", required=True, help="comma-separated task names that must be served")
    complete.add_argument("--api-key", default="unused", help="the API key to send (default: 'unused')")
    complete.add_argument("--max-tokens", type=int, default=8, help="completion tokens per request (default: 8)")
    complete.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    complete.set_defaults(func=run_complete)

    rebase = commands.add_parser("rebase-delta", help="copy a delta file, naming another base in its header")
    rebase.add_argument("source", type=Path, help="the delta file to copy")
    rebase.add_argument("destination", type=Path, help="the file to write, named TASK.delta.safetensors")
    rebase.add_argument("--fingerprint", required=True, help="the base fingerprint to record, sha256:<64 hex digits>")
    rebase.set_defaults(func=run_rebase_delta)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="smoke-check: %(message)s")
    # The openai client logs one INFO line per request through httpx (or httpx2, its fork).
    for transport in ("httpx", "httpx2"):
        logging.getLogger(transport).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
