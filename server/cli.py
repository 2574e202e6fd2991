"""The `deltamux` command line: gathers the subcommands that each package contributes.

Each module in COMMAND_MODULES exposes `add_commands(subparsers)`; every command it adds sets
`func`, which takes the parsed arguments and returns the process exit code. Modules are imported
only to build the parser, and each command imports its heavy dependencies when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "deltastore.cli",  # compress, inspect, verify, reconstruct, evaluate
    "deltastore.realdata.cli",  # fetch-base, prepare-data, finetune, score-task
    "server.serve_cli",  # serve
    "server.loadtest.cli",  # loadtest
)


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every subcommand whose module is importable."""
    parser = argparse.ArgumentParser(
        prog="deltamux",
        description="Serve many fine-tunes of one base model from pruned sparse deltas.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING or ERROR (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Skip a command module that is not installed, but not one whose own imports fail.
            if e.name is None or not module_name.startswith(e.name):
                raise
            continue
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `deltamux` subcommand and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
