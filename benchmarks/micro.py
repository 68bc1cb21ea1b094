#!/usr/bin/env python3
"""Micro-benchmarks of the per-chunk and per-connection paths, in-process, no network.

    python benchmarks/micro.py [--repeat 5] [--number 20000]

Each figure is the best of `--repeat` timings of `--number` calls, in microseconds per call, so
machine noise inflates it less than a load test (the minimum is the least disturbed run). What is
measured:

- chunk: `EchoConnection.data_received` of 1 KiB on a transport whose `write` does nothing,
  against the bare minimum (`transport.write(data)` in a method): the byte path's bookkeeping.
- close record: one `connection closed` record through the CLI's structlog configuration
  (JSON to a file, 20 records per event-loop iteration) against structlog's stock pipeline
  (`JSONRenderer()`, `TimeStamper(fmt="iso")`, `WriteLoggerFactory`), which echo-async used before.
- connection: `EchoConnection` set-up, its close-record fields and the server's accounting for
  one connection, with logging to a null logger.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from echo_async.connection import EchoConnection, ReadBuffer
from echo_async.logs import configure_logging

RECORD = {
    "peer": "127.0.0.1:51234",
    "local": "127.0.0.1:12000",
    "bytes_in": 64,
    "bytes_out": 64,
    "duration_s": 0.000123,
    "reason": "eof",
}


class NullTransport:
    """Just enough transport for EchoConnection: writes go nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 12000)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


class NullOwner:
    def connection_closed(self, connection: EchoConnection) -> None:
        connection.record()

    def connection_opened(self, connection: EchoConnection) -> None:
        pass

    def connection_rejected(self, connection: EchoConnection, reason: str, detail: str) -> None:
        pass

    def header_ended(self, connection: EchoConnection, payload: bytes) -> None:
        connection.open()

    def handshake_done(self, connection: EchoConnection, transport: Any) -> None:
        connection.open()


class Bare:
    """The least a Python echo Protocol can do per chunk."""

    def __init__(self, transport: NullTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def best(function: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6


def log_cost(configure: Callable[[Any], object], number: int, repeat: int) -> float:
    """Microseconds per close record, 20 records per loop iteration, written to a file."""
    with tempfile.TemporaryDirectory() as directory, (Path(directory) / "log").open("w") as stream:
        configure(stream)
        log = structlog.get_logger("echo_async")

        async def records() -> None:
            for index in range(number):
                log.info("connection closed", **RECORD)
                if index % 20 == 19:
                    await asyncio.sleep(0)
            await asyncio.sleep(0)

        timings = []
        for _ in range(repeat):
            started = timeit.default_timer()
            asyncio.run(records())
            timings.append(timeit.default_timer() - started)
        structlog.reset_defaults()
    return min(timings) / number * 1e6


def stock_structlog(stream: Any) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args(argv)
    number, repeat = args.number, args.repeat

    transport = NullTransport()
    chunk = bytes(1024)
    connection = EchoConnection(NullOwner(), transport, None, ("127.0.0.1", 1))  # type: ignore[arg-type]
    bare = Bare(transport)
    rows = [
        ("chunk: bare transport.write", best(lambda: bare.data_received(chunk), number, repeat)),
        ("chunk: EchoConnection", best(lambda: connection.data_received(chunk), number, repeat)),
        (
            "close record: stock structlog",
            log_cost(stock_structlog, number, repeat),
        ),
        (
            "close record: echo-async CLI",
            log_cost(lambda stream: configure_logging("json", "info", stream), number, repeat),
        ),
    ]
    owner = NullOwner()
    reads = ReadBuffer()  # one per server, as EchoServer has

    def one_connection() -> None:
        opened = EchoConnection(owner, transport, None, ("127.0.0.1", 51234), reads=reads)  # type: ignore[arg-type]
        opened.data_received(b"x" * 64)
        opened.eof_received()
        opened.connection_lost(None)

    rows.append(("connection: set-up, 64 B, close", best(one_connection, number, repeat)))
    width = max(len(name) for name, _ in rows)
    print(f"python {sys.version.split()[0]}, best of {repeat} x {number} calls")
    for name, micros in rows:
        print(f"{name:<{width}}  {micros:7.3f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
