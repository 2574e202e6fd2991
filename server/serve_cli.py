"""The `deltamux serve` subcommand: one flag per Settings field, each also read from DELTAMUX_<NAME>.

Flags default to None, so a value given neither on the command line nor in the environment
falls back to the Settings default.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

# Flags with a fixed set of values; the others take any string and Settings validates it.
_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "swap_mode": ("exact", "subtract"),
}
# log_level is the top-level --log-level flag of `deltamux`; DELTAMUX_LOG_LEVEL still applies.
_SKIPPED = {"log_level"}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve`."""
    from server.settings import Settings  # noqa: PLC0415 (pydantic-settings only when building the parser)

    parser = subparsers.add_parser(
        "serve",
        help="serve the base and every task of a delta store through an OpenAI-compatible API",
        description="Keep one base model resident and serve every task in the delta store; every flag can also "
        "be set with an environment variable DELTAMUX_<FLAG> (for example DELTAMUX_PORT=8000).",
    )
    for name, field in Settings.model_fields.items():
        if name in _SKIPPED:
            continue
        default = "required" if field.is_required() else f"default: {field.default}"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            choices=_CHOICES.get(name),
            help=f"{field.description} ({default}; env DELTAMUX_{name.upper()})",
        )
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Validate the settings, build the app and run uvicorn until interrupted."""
    import uvicorn  # noqa: PLC0415
    from pydantic import ValidationError  # noqa: PLC0415

    from server.app import create_app  # noqa: PLC0415
    from server.settings import Settings  # noqa: PLC0415

    explicit = {name: value for name, value in vars(args).items() if name in Settings.model_fields and value is not None}
    try:
        settings = Settings(**explicit)
    except ValidationError as e:
        for error in e.errors():
            flag = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
            logger.error("invalid %s: %s (got %r)", flag, error["msg"], error.get("input"))
        return 2
    if "log_level" in settings.model_fields_set:
        logging.getLogger().setLevel(settings.log_level.upper())

    logger.info("starting deltamux serve on http://%s:%d", settings.host, settings.port)
    # log_config=None keeps the logging set up by the entry point for uvicorn's loggers too.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)
    return 0
