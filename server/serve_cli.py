"""The `deltamux serve` subcommand: one flag per Settings field, each also read from DELTAMUX_<NAME>.

Flags default to None, so a value given neither on the command line nor in the environment
falls back to the Settings default. API keys inline have no flag, because a command line is
visible to every user of the machine: use --api-keys-file or DELTAMUX_API_KEYS.

On SIGTERM (or Ctrl-C) the server drains. It closes its listening socket and returns 503 to any
further /v1 request on an open connection. It waits up to `shutdown_timeout` seconds for
in-flight requests, then stops the engine, which restores the base weights, and exits with 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket

logger = logging.getLogger(__name__)

# Flags with a fixed set of values; the others take any string and Settings validates it.
_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "swap_mode": ("exact", "subtract", "full"),
    "batching": ("per-task", "mixed"),
}
# log_level is the top-level --log-level flag of `deltamux`; DELTAMUX_LOG_LEVEL still applies.
# api_keys is read only from DELTAMUX_API_KEYS, so keys never appear in a process listing.
_SKIPPED = {"log_level", "api_keys"}


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

    from deltastore.checkpoint import Checkpoint  # noqa: PLC0415
    from server.app import create_app  # noqa: PLC0415
    from server.auth import KeyConfigError  # noqa: PLC0415
    from server.settings import Settings, resolve_placement  # noqa: PLC0415

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

    # 1. Cheap checks and the listening socket before anything loads, so a wrong base folder or a
    #    port in use fails at once with one line, not after the model has loaded.
    try:
        resolve_placement(settings)
        Checkpoint.open(settings.base)
    except ValueError as e:  # CheckpointError is a ValueError
        logger.error("cannot start: %s", e)
        return 2
    try:
        listener = _listen(settings.host, settings.port)
    except OSError as e:
        logger.error(
            "cannot listen on %s:%d: %s; choose another --port or stop the process that uses it",
            settings.host, settings.port, e.strerror or e,
        )
        return 2

    try:
        app = create_app(settings)
    except KeyConfigError as e:
        listener.close()
        logger.error("cannot start: %s", e)
        return 2

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, which also marks the app as draining when a stop signal arrives."""

        def handle_exit(self, sig: int, frame) -> None:
            if not app.state.draining:
                logger.info("received %s: draining for up to %.0f s", signal.Signals(sig).name, settings.shutdown_timeout)
            app.state.draining = True
            super().handle_exit(sig, frame)

    # uvicorn (0.55) raises a captured SIGTERM again after its graceful shutdown. This handler
    # catches that second SIGTERM, so a drained server exits with 0 instead of being killed.
    stopped_by: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped_by.append(sig))
    try:
        logger.info("starting deltamux serve on http://%s:%d", settings.host, settings.port)
        # log_config=None keeps the logging set up by the entry point for uvicorn's loggers too.
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_config=None,
            timeout_graceful_shutdown=settings.shutdown_timeout,
        )
        server = DrainingServer(config)
        server.run(sockets=[listener])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        logger.error("the server did not start; see the errors above")
        return 3  # uvicorn's own exit status for a failed start-up
    if stopped_by:
        logger.info("stopped after SIGTERM")
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port (IPv4 or IPv6, as the address resolves); raise OSError if taken."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=2048)
