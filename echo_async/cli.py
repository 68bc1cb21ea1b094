"""The `echo-async` command: arguments -> ServerConfig -> run; exit statuses.

Exit statuses: 0 after a graceful shutdown, 2 for anything the user can fix (bad option, address
in use), 130 when a second SIGINT aborted the drain. Errors are one line on stderr, never a
traceback. This is the only module that installs uvloop, signal handlers and log output.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import structlog

from echo_async import __version__
from echo_async.config import OPTIONS, OPTIONS_BY_NAME, ConfigError, Option
from echo_async.logs import configure_logging
from echo_async.loops import LoopUnavailable, choose_loop
from echo_async.service import (
    EXIT_ABORTED,
    EXIT_OK,
    WORKER_ENVIRONMENT_VARIABLE,
    StartupError,
    run_service,
)
from echo_async.sources import CONFIG_ENVIRONMENT_VARIABLE, load_service_config, render_toml

EXIT_USAGE = 2
__all__ = ["EXIT_ABORTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


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


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # Only options given on the command line land in the namespace (default=SUPPRESS), so that
    # the environment and the config file can supply the rest: flags > env > file > defaults.
    for option in OPTIONS:
        names = [option.flag]
        extra: dict[str, Any] = {}
        if option.kind is bool:
            extra["action"] = argparse.BooleanOptionalAction
        elif option.kind is tuple:
            extra["action"] = "append"
            extra["metavar"] = "URL"
        elif option.choices:
            extra["choices"] = option.choices
        else:
            extra["type"] = option.kind
            extra["metavar"] = "HOST:PORT" if option.name == "metrics" else _metavar(option)
        parser.add_argument(
            *names,
            dest=option.name,
            default=argparse.SUPPRESS,
            help=f"{option.help} (default: {_default_text(option)}; "
            f"env {option.environment_variable})",
            **extra,
        )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"TOML file of option = value lines (env {CONFIG_ENVIRONMENT_VARIABLE})",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML and exit",
    )


def _default_text(option: Option) -> str:
    """The default as --help shows it; no `listen` means one listener on --host and --port."""
    if option.name == "listen":
        return "tcp://HOST:PORT from --host/--port"
    return repr(option.default)


def _metavar(option: Option) -> str:
    special = {
        "udp_rate": "PER_S",
        "unix_mode": "MODE",
        "tls_client_ca": "FILE",
        "fault_delay": "MS",
        "fault_jitter": "MS",
        "fault_rate": "BYTES_PER_S",
        "fault_drop": "P",
        "greeting": "TEXT",
        "proxy_trusted": "CIDRS",
    }
    if option.name in special:
        return special[option.name]
    if option.name.startswith("tls_") and option.kind is str:
        return "FILE"
    if option.kind is float:
        return "SECONDS"
    if option.kind is int:
        return "BYTES" if "bytes" in option.name or "buffer" in option.name else "N"
    return option.name.upper()


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


def run_serve(args: argparse.Namespace) -> int:
    """Validate everything, then run the server until a signal; nothing starts on bad input."""
    flags = {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in vars(args).items()
        if name in OPTIONS_BY_NAME
    }
    try:
        service = load_service_config(flags, os.environ, args.config)
        choice = choose_loop(service.loop)
    except (ConfigError, LoopUnavailable) as error:
        return _fail(str(error))
    if args.print_config:
        sys.stdout.write(render_toml(service))
        return EXIT_OK
    worker = os.environ.get(WORKER_ENVIRONMENT_VARIABLE)
    # Set by the supervisor: every record of a worker says which one it is.
    fields = {"worker": int(worker)} if worker is not None and worker.isdigit() else None
    configure_logging(service.log_format, service.log_level, fields=fields)
    if choice.fallback is not None:
        structlog.get_logger("echo_async.cli").warning(
            "uvloop unavailable, using the asyncio loop", error=choice.fallback
        )
    try:
        if service.workers > 1:
            from echo_async.supervisor import run_supervisor

            return run_supervisor(service)
        return run_service(service, choice)
    except StartupError as error:
        return _fail(str(error))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
