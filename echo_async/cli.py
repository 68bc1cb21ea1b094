"""The `echo-async` command: arguments -> ServerConfig -> run; exit statuses.

Exit statuses: 0 after a graceful shutdown, 2 for anything the user can fix (bad option, address
in use), 130 when a second SIGINT aborted the drain. Errors are one line on stderr, never a
traceback. This is the only module that installs uvloop, signal handlers and log output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, NoReturn

import structlog

from echo_async import __version__
from echo_async.config import ConfigError, ServerConfig, option_flag
from echo_async.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from echo_async.loops import LOOP_CHOICES, LoopUnavailable, choose_loop
from echo_async.server import EchoServer

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ABORTED = 128 + signal.SIGINT


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: `serve` and `bench`."""
    parser = _Parser(
        prog="echo-async",
        description="An RFC 862 echo service on asyncio and uvloop, and its load tester.",
    )
    parser.add_argument("--version", action="version", version=f"echo-async {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the echo service",
        description="Run the echo service until SIGTERM or SIGINT, then drain and exit 0.",
    )
    _add_serve_arguments(serve)
    bench = commands.add_parser(
        "bench",
        help="load-test an echo server",
        description="Load-test any echo server with many concurrent clients, checking every byte.",
    )
    from echo_async.bench import cli as bench_cli

    bench_cli.add_arguments(bench)
    return parser


def _type_name(annotation: Any) -> type[Any]:
    return {"int": int, "float": float, "str": str, "bool": bool}[str(annotation)]


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    for option in fields(ServerConfig):
        kind = _type_name(option.type)
        parser.add_argument(
            option_flag(option.name),
            dest=option.name,
            type=kind,
            default=getattr(defaults, option.name),
            metavar=option.name.upper() if kind is str else kind.__name__.upper(),
            help=f"{option.metadata['help']} (default: %(default)s)",
        )
    parser.add_argument(
        "--loop",
        choices=LOOP_CHOICES,
        default="auto",
        help="event loop; auto uses uvloop when it can be imported (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto",
        help="auto is console on a terminal, JSON lines otherwise (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="(default: %(default)s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `echo-async` and `python -m echo_async`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    from echo_async.bench import cli as bench_cli

    return bench_cli.run(args)


def _fail(message: str) -> int:
    print(f"echo-async serve: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _os_reason(error: OSError) -> str:
    """The OS's words for an error, without asyncio's wrapping ("error while attempting...")."""
    if isinstance(error, socket.gaierror) or not error.errno or error.errno < 0:
        return (error.strerror or str(error)).lower()
    return os.strerror(error.errno).lower()


def run_serve(args: argparse.Namespace) -> int:
    """Validate everything, then run the server until a signal; nothing starts on bad input."""
    try:
        config = ServerConfig(**{name: getattr(args, name) for name in ServerConfig.option_names()})
        choice = choose_loop(args.loop)
    except (ConfigError, LoopUnavailable) as error:
        return _fail(str(error))
    configure_logging(args.log_format, args.log_level)
    log = structlog.get_logger("echo_async.cli")
    if choice.fallback is not None:
        log.warning("uvloop unavailable, using the asyncio loop", error=choice.fallback)
    with asyncio.Runner(loop_factory=choice.factory) as runner:
        return runner.run(_serve(config, choice.name))


async def _serve(config: ServerConfig, loop_name: str) -> int:
    log = structlog.get_logger("echo_async.cli")
    server = EchoServer(config)
    try:
        await server.start()
    except OSError as error:
        return _fail(f"cannot listen on {config.host}:{config.port}: {_os_reason(error)}")
    log.info("serving", loop=loop_name, version=__version__)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    status = EXIT_OK

    def on_signal(signum: signal.Signals) -> None:
        nonlocal status
        if not stop.is_set():
            log.info("signal received, draining", signal=signum.name)
            stop.set()
        elif signum == signal.SIGINT:
            log.warning("second SIGINT, aborting open connections", signal=signum.name)
            status = EXIT_ABORTED
            server.abort_connections()

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await stop.wait()
        await server.close()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    log.info("exiting", status=status)
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
