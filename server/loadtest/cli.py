"""The `deltamux loadtest` subcommand.

Exit codes: 0 when the run finished (failed requests are counted in the report, not fatal), 2 on
invalid arguments, an unreadable prompt or trace file, or an unreachable server.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `loadtest`."""
    parser = subparsers.add_parser(
        "loadtest",
        help="send a multi-task load to a running server and report latency, throughput and swaps",
        description="Send streaming completions to a deltamux server, with tasks drawn from a mix, and write "
        "report.json, summary.csv, requests.csv and PNG plots. Give --rate for Poisson arrivals or "
        "--concurrency for a closed loop of users; a trace mix brings its own arrival times.",
    )
    parser.add_argument("--url", required=True, help="server base URL, for example http://127.0.0.1:8000")
    parser.add_argument("--tasks", required=True, help="comma-separated model ids to load: tasks and/or the base")
    parser.add_argument("--mix", default="uniform", help="task mix: uniform, zipf:S or trace:FILE (default: uniform)")
    parser.add_argument("--rate", type=float, default=None, help="mean arrivals per second (open loop, Poisson)")
    parser.add_argument("--concurrency", type=int, default=None, help="users in a closed loop, each waiting for its last request")
    parser.add_argument("--duration", type=float, required=True, help="seconds during which new requests start")
    parser.add_argument("--prompts", type=Path, required=True, help="prompt file: one prompt per line, or JSONL with 'prompt' or 'messages'")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report files; created if missing")
    parser.add_argument("--api-key", default=None, help="bearer token sent with every request")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    parser.add_argument("--ignore-eos", action="store_true", help="decode max_tokens tokens per request regardless of end tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times, task draws and prompt choice (default: 0)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take (default: 600)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="hide the live progress bar")
    parser.set_defaults(func=run_loadtest)


class ArgumentError(ValueError):
    """A loadtest argument that cannot be used; the CLI prints it as one line and exits with 2."""


def build_config(args: argparse.Namespace):
    """Validate the arguments and return the LoadConfig; raise ArgumentError, MixSpecError or PromptFileError."""
    from server.loadtest.mix import parse_mix  # noqa: PLC0415
    from server.loadtest.prompts import load_prompts  # noqa: PLC0415
    from server.loadtest.runner import LoadConfig  # noqa: PLC0415

    # 1. Where to send: an http(s) URL with a host, nothing else.
    url = args.url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ArgumentError(f"invalid --url {args.url!r}; write a base URL such as http://127.0.0.1:8000")

    # 2. What to send and how fast.
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    mix = parse_mix(args.mix, tasks)
    if not (math.isfinite(args.duration) and args.duration > 0):
        raise ArgumentError(f"invalid --duration {args.duration!r}; give a positive number of seconds")
    if mix.trace is not None:
        if args.rate is not None or args.concurrency is not None:
            raise ArgumentError("a trace mix brings its own arrival times; drop --rate and --concurrency")
    elif (args.rate is None) == (args.concurrency is None):
        raise ArgumentError("give exactly one of --rate (Poisson arrivals per second) or --concurrency (closed-loop users)")
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        raise ArgumentError(f"invalid --rate {args.rate!r}; give a positive number of requests per second")
    if args.concurrency is not None and args.concurrency < 1:
        raise ArgumentError(f"invalid --concurrency {args.concurrency!r}; give 1 or more users")
    if args.max_tokens < 1:
        raise ArgumentError(f"invalid --max-tokens {args.max_tokens!r}; give 1 or more")
    if not 0.0 <= args.temperature <= 2.0:
        raise ArgumentError(f"invalid --temperature {args.temperature!r}; give a value in [0, 2]")
    if not args.request_timeout > 0:
        raise ArgumentError(f"invalid --request-timeout {args.request_timeout!r}; give a positive number of seconds")
    prompts = load_prompts(args.prompts)

    return LoadConfig(
        url=url, mix=mix, prompts=prompts, duration=args.duration, rate=args.rate, concurrency=args.concurrency,
        max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos, api_key=args.api_key,
        seed=args.seed, request_timeout=args.request_timeout, progress=not args.no_progress,
    )


def run_loadtest(args: argparse.Namespace) -> int:
    """Run the load test and write its report; return 2 on bad input or an unreachable server."""
    from server.loadtest.report import format_summary, summarize, write_report  # noqa: PLC0415
    from server.loadtest.runner import LoadTestError, run_load  # noqa: PLC0415

    try:
        config = build_config(args)
    except ValueError as e:  # ArgumentError, MixSpecError and PromptFileError
        print(f"deltamux loadtest: error: {e}", file=sys.stderr)
        return 2
    try:
        result = run_load(config)
    except LoadTestError as e:
        print(f"deltamux loadtest: error: {e}", file=sys.stderr)
        return 2

    files = write_report(result, args.out, plots=not args.no_plots)
    print(format_summary(summarize(result)))
    print(f"report: {files.json}")
    return 0
