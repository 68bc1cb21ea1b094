#!/usr/bin/env python3
"""The Python ceiling for comparison: uvloop's bare echo Protocol, no counting, no logging.

    python benchmarks/bare_protocol.py PORT

What every echo byte path in Python on uvloop pays (one callback and one write per chunk) and
nothing else; benchmarks/run.py runs it beside echo-async so the cost of echo-async's features
shows as the gap between the two. Serves 127.0.0.1 until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
