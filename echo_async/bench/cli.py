"""The ``echo-async bench`` subcommand: flags -> BenchConfig -> run -> report; exit statuses.

``echo_async.cli`` calls :func:`add_arguments` on its ``bench`` subparser and returns
:func:`run`'s value as the process exit status: 0 all good; 1 the run failed its checks
(nothing echoed, fewer than --requests, mismatched bytes, more errors than --max-errors, hold
could not open every connection) or could not be carried out (--host does not resolve);
2 a usage error, or an output file (--json, --plot, --hdr-log) that cannot be written,
reported in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from echo_async.bench import hdr, plot, report
from echo_async.bench.config import MODES, BenchConfig, BenchConfigError
from echo_async.bench.result import BenchResult
from echo_async.bench.runner import BenchError, ProgressCallback, new_event_loop, run_bench

PROGRAM = "echo-async bench"
_UNITS = {"": 1, "k": 1000, "ki": 1024, "m": 1000**2, "mi": 1024**2}


def byte_size(text: str) -> int:
    """Parse a size such as 1024, 1k (1000), 1KiB (1024), 64ki, 1M, 1MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*(k|ki|m|mi)?b?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (try 1024 or 1KiB)")
    return int(match[1]) * _UNITS[(match[2] or "").lower()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Define every ``bench`` flag on ``parser``."""
    parser.epilog = parser.epilog or (
        "exit status: 0 all checks passed; 1 nothing echoed, fewer than --requests, mismatched "
        "bytes, more errors than --max-errors, (hold) not every connection opened and echoed, "
        "or --host does not resolve; 2 usage error"
    )
    parser.description = parser.description or (
        "Load-test any echo server (RFC 862) with many concurrent clients. Every echoed byte "
        "is checked against what was sent; a run that echoed nothing or fell short of "
        "--requests, a mismatch, more errors than --max-errors, or (hold) a connection that "
        "could not be opened makes the exit status 1."
    )
    target = parser.add_argument_group("target")
    target.add_argument("--host", default="127.0.0.1", help="server host (default: %(default)s)")
    target.add_argument("--port", type=int, help="server TCP (or --udp) port")
    target.add_argument("--unix", metavar="PATH", help="server Unix socket, instead of --port")
    target.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS. Without --tls-ca any certificate is accepted (self-signed test "
        "servers are the common case for a load tester): use --tls-ca to verify",
    )
    target.add_argument(
        "--tls-ca", metavar="FILE", help="verify the server certificate (and --host) against FILE"
    )
    target.add_argument("--udp", action="store_true", help="UDP datagrams (pingpong only)")
    target.add_argument(
        "--url",
        metavar="ws://HOST:PORT/PATH",
        help="a WebSocket echo server, instead of --host and --port (giving those too is an "
        "error unless they repeat the URL): one binary message per echo, every mode. wss:// "
        "is TLS as with --tls: any certificate unless --tls-ca",
    )
    target.add_argument(
        "--greeting",
        action="store_true",
        help="the server sends one line when a connection opens (echo-async serve --greeting): "
        "read it first on every connection and report connections per distinct line, to see "
        "how a load balancer spreads them. A line that is missing, longer than 1024 bytes or "
        "not complete within --timeout is an error",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--mode",
        choices=MODES,
        required=True,
        help="pingpong: send SIZE, wait for it back, repeat (round trips/s, latency); "
        "stream: keep a window in flight (echoed bytes/s); oneshot: connect, echo, close, "
        "repeat (connections/s); hold: open every connection, echo once, stay idle (capacity)",
    )
    load.add_argument(
        "--connections",
        type=int,
        required=True,
        metavar="N",
        help="concurrent connections (UDP: sockets)",
    )
    load.add_argument(
        "--size",
        type=byte_size,
        required=True,
        metavar="BYTES",
        help="bytes per message, e.g. 64, 1KiB, 1MiB",
    )
    load.add_argument("--duration", type=float, metavar="S", help="run for S seconds")
    load.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="run until N round trips (oneshot: connections) in total",
    )
    load.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="total round trips (oneshot: connections) per second, spread over the "
        "connections; latency is then timed from when each was due (coordinated omission "
        "corrected, as wrk2 does)",
    )
    load.add_argument(
        "--connect-rate",
        type=float,
        metavar="R",
        help="open at most R new connections per second while ramping up",
    )
    load.add_argument(
        "--pipeline",
        type=int,
        metavar="K",
        help="messages in flight per connection (pingpong default 1; stream default: "
        "256 KiB worth)",
    )
    load.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="spread connections over N processes; results merge exactly",
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="connect timeout, and how long an echo may take before it counts "
        "as an error (default: %(default)s)",
    )
    load.add_argument(
        "--max-errors",
        type=int,
        default=0,
        metavar="N",
        help="errors tolerated; one more fails the run and ends it early "
        "(hold keeps going to count capacity) (default: %(default)s)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--json", metavar="FILE", type=Path, help="write the result as JSON")
    output.add_argument(
        "--plot",
        metavar="FILE.png",
        type=Path,
        help="draw throughput and latency over time (needs echo-async[plot])",
    )
    output.add_argument(
        "--hdr-log",
        metavar="FILE",
        type=Path,
        help="write the latency of every quarter second as an HdrHistogram interval log "
        "(nanoseconds), which HdrHistogram's log readers and tools read",
    )
    output.add_argument(
        "--quiet",
        action="store_true",
        help="no live progress and no summary table; problems still go to stderr",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig the flags describe; BenchConfigError names a bad flag."""
    return BenchConfig(
        mode=args.mode,
        connections=args.connections,
        size=args.size,
        duration=args.duration,
        requests=args.requests,
        host=args.host,
        port=args.port,
        unix_path=args.unix,
        url=args.url,
        tls=args.tls,
        tls_ca=args.tls_ca,
        udp=args.udp,
        greeting=args.greeting,
        rate=args.rate,
        connect_rate=args.connect_rate,
        pipeline=args.pipeline,
        processes=args.processes,
        max_errors=args.max_errors,
        timeout=args.timeout,
    )


def _fail(message: str) -> None:
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)


def _check_output(flag: str, path: Path | None) -> None:
    """Raise BenchConfigError, before any load, when ``path`` clearly cannot be written.

    A run can take long: finding out only when writing its result wastes it. Writing can still
    fail later (a full disk); that is also one line and exit status 2.
    """
    if path is None:
        return
    if not path.parent.is_dir():
        raise BenchConfigError(f"{flag} {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise BenchConfigError(f"{flag} {path}: is a directory")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise BenchConfigError(f"{flag} {path}: permission denied")


def _raise_descriptor_limit(config: BenchConfig) -> None:
    """Let one process open its share of connections, if the hard limit allows."""
    needed = -(-config.connections // config.processes) + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        if wanted < needed:
            print(
                f"{PROGRAM}: warning: {needed - 64} connections per process need about {needed} "
                f"file descriptors but the limit is {wanted}; expect failures "
                "(raise ulimit -n or use --processes)",
                file=sys.stderr,
            )


async def _run(config: BenchConfig, progress: ProgressCallback) -> BenchResult:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C stops the run early and still reports; signals can only be handled in the main
    # thread (tests may call run() from another one).
    handle_signals = threading.current_thread() is threading.main_thread()
    if handle_signals:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        return await run_bench(config, progress=progress, stop=stop)
    finally:
        if handle_signals:
            loop.remove_signal_handler(signal.SIGINT)


def run(args: argparse.Namespace) -> int:
    """Run the bench the parsed flags describe; return the exit status (0, 1 or 2)."""
    try:
        config = config_from_args(args)
        config.ssl_context()  # a bad --tls-ca is a usage error, found before any load
        if args.plot is not None:
            plot.check_available()
        _check_output("--json", args.json)
        _check_output("--plot", args.plot)
        _check_output("--hdr-log", args.hdr_log)
    except (BenchConfigError, plot.PlotUnavailable) as exc:
        _fail(str(exc))
        return 2
    _raise_descriptor_limit(config)
    console = Console()
    live = report.LiveProgress(console, enabled=not args.quiet and console.is_terminal)
    try:
        with live, asyncio.Runner(loop_factory=new_event_loop) as runner:
            result = runner.run(_run(config, live))
    except BenchError as exc:
        _fail(str(exc))
        return 1
    if not args.quiet:
        console.print(report.summary_table(result))
    outputs: list[tuple[Path | None, Callable[[Path, BenchResult], None]]] = [
        (args.json, report.write_json),
        (args.plot, plot.write_plot),
        (args.hdr_log, hdr.write_log),
    ]
    for path, write in outputs:
        if path is None:
            continue
        try:
            write(path, result)
        except OSError as exc:
            # Not exc.filename: an error raised when the file is flushed or closed has none.
            _fail(f"cannot write {path}: {exc.strerror or exc}")
            return 2
    if result.latency_clamped:
        top = result.latency_hdr.highest_trackable_value / 1e9
        print(
            f"{PROGRAM}: warning: {result.latency_clamped} latencies were above {top:g}s, the "
            f"top of the histogram's range, and are counted as {top:g}s",
            file=sys.stderr,
        )
    for problem in result.problems():
        print(f"{PROGRAM}: {problem}", file=sys.stderr)
    return 0 if result.ok else 1
