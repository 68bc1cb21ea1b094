"""``--greeting``: read the line a server sends when a connection opens, count it per backend.

A :class:`GreetingReader` is a connection's protocol only until that line is in; it then hands
the transport to the bench client, which starts its traffic as it would without a greeting.
The greeting never reaches the clients' byte checks, and their hot paths pay nothing for it.
"""

from __future__ import annotations

import asyncio
from typing import cast

from echo_async.bench.clients import Client
from echo_async.bench.counters import describe

GREETING_LIMIT = 1024
"""Most bytes a greeting line may take, its newline included."""


class GreetingError(Exception):
    """A connection ended or misbehaved before its greeting line; the message groups errors."""


class GreetingReader(asyncio.Protocol):
    """Reads up to the first newline, counts the line, then gives the connection to ``client``.

    ``greeted`` resolves once ``client`` has the connection (and has started sending), or fails
    with :class:`GreetingError`; whoever awaits it aborts the transport when it fails or is
    cancelled. The line is counted in ``client.counters.backends``, decoded as UTF-8 (bad bytes
    replaced) without its newline, or its CR LF.
    """

    __slots__ = ("buffer", "client", "greeted", "handed_over", "transport")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.buffer = b""
        self.handed_over = False
        self.greeted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.greeted.done():  # failed or given up on: the transport is being aborted
            return
        buffer = self.buffer + data
        end = buffer.find(b"\n", 0, GREETING_LIMIT)
        if end < 0:
            if len(buffer) >= GREETING_LIMIT:
                self.greeted.set_exception(
                    GreetingError(f"no newline in the first {GREETING_LIMIT} bytes")
                )
            else:
                self.buffer = buffer
            return
        self.buffer = b""
        text = buffer[:end].removesuffix(b"\r").decode("utf-8", errors="replace")
        client = self.client
        backends = client.counters.backends
        backends[text] = backends.get(text, 0) + 1
        rest = buffer[end + 1 :]
        if rest:
            # The client has sent nothing yet, so these cannot be echoes: feeding them to its
            # checks would shift every later byte of the stream and miscount all of them.
            client.counters.mismatch(
                len(rest),
                f"connection {client.index}: {len(rest)} bytes after the greeting line, "
                "before anything was sent",
            )
        self.handed_over = True
        self.transport.set_protocol(client)
        client.connection_made(self.transport)
        self.greeted.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.greeted.done():
            return
        reason = "connection closed before the greeting line" if exc is None else describe(exc)
        self.greeted.set_exception(GreetingError(reason))
