"""EchoServer: runs one ServerConfig's listeners, tracks its connections, shuts down gracefully.

The server never touches process-wide state: no event loop policy, no signal handlers, no logging
configuration. It logs through `structlog.get_logger("echo_async")`; the host application decides
where those records go.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import structlog

from echo_async.config import ServerConfig
from echo_async.connection import REASON_SHUTDOWN, EchoConnection, format_address

LOGGER_NAME = "echo_async"
# How long a draining connection must stay quiet before it is closed (nginx's lingering close).
LINGER_S = 0.5


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a server's counters since it started."""

    connections_active: int
    connections_total: int
    bytes_in: int
    bytes_out: int


class EchoServer:
    """An RFC 862 echo server on the running event loop.

    Use it as `async with EchoServer(config) as server:`; leaving the block closes it gracefully.
    Or call `await start()` and later `await close()`.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config if config is not None else ServerConfig()
        self._servers: list[asyncio.Server] = []
        self._bound: list[Any] = []
        self._connections: set[EchoConnection] = set()
        self._connections_total = 0
        self._closed_bytes_in = 0
        self._closed_bytes_out = 0
        self._started_at = 0.0
        self._closing = False
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._log: Any = structlog.get_logger(LOGGER_NAME)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting; raises OSError when an address can't be bound."""
        if self._servers:
            raise RuntimeError("EchoServer already started")
        # Bound here, not at import, so the host's logging configuration applies.
        self._log = structlog.get_logger(LOGGER_NAME).bind()
        config = self.config
        server = await asyncio.start_server(
            self._accept,
            host=config.host,
            port=config.port,
            backlog=config.backlog,
            reuse_address=True,
        )
        self._servers.append(server)
        self._bound.extend(sock.getsockname() for sock in server.sockets)
        self._started_at = time.monotonic()
        self._log.info("listening", addresses=self.addresses)

    async def serve_forever(self) -> None:
        """Wait until the server is closed (by `close()` elsewhere, or by leaving `async with`)."""
        if not self._servers:
            raise RuntimeError("EchoServer is not started")
        await self._closed.wait()

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting, let open connections finish echoing, abort the rest after `timeout` s.

        Each open connection gets everything it already sent echoed back, then EOF; bytes that
        arrive after that are read and dropped. Connections still open at the deadline (for
        instance clients that stopped reading) are aborted. `timeout` defaults to the
        configuration's `shutdown_timeout`.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        deadline_s = self.config.shutdown_timeout if timeout is None else timeout
        try:
            for server in self._servers:
                server.close()
            draining = len(self._connections)
            if draining:
                self._log.info(
                    "shutting down", connections_open=draining, shutdown_timeout_s=deadline_s
                )
            for connection in list(self._connections):
                connection.begin_shutdown()
            aborted = await self._drain(deadline_s)
            for server in self._servers:
                await server.wait_closed()
            stats = self.stats
            self._log.info(
                "server closed",
                connections_total=stats.connections_total,
                bytes_in=stats.bytes_in,
                bytes_out=stats.bytes_out,
                aborted_at_shutdown=aborted,
                uptime_s=round(time.monotonic() - self._started_at, 3) if self._servers else 0.0,
            )
        finally:
            self._closed.set()

    async def _drain(self, timeout: float) -> int:
        """Wait for draining connections to end; close quiet ones, abort the rest at the deadline.

        Returns how many were aborted. A connection whose echo is flushed and whose client sent
        nothing during a whole `LINGER_S` is closed: the client has our FIN and all its bytes, and
        since nothing is left unread on our side, closing sends no reset.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._connections:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._idle.wait(), min(LINGER_S, remaining))
            except TimeoutError:
                for connection in list(self._connections):
                    connection.close_if_quiet()
        aborted = len(self._connections)
        if aborted:
            self.abort_connections()
            # connection_lost arrives on the next loop iterations.
            await self._idle.wait()
        return aborted

    def abort_connections(self) -> None:
        """Abort every open connection now (reason `shutdown`); used to cut a drain short."""
        for connection in list(self._connections):
            connection.abort(REASON_SHUTDOWN)

    async def __aenter__(self) -> EchoServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- what a caller can read ----------------------------------------------------------------

    @property
    def host(self) -> str:
        """The host of the first bound address (still known after close)."""
        return self._first_socket_address()[0]  # type: ignore[no-any-return]

    @property
    def port(self) -> int:
        """The port of the first bound address (the one the OS picked when the config says 0)."""
        return self._first_socket_address()[1]  # type: ignore[no-any-return]

    @property
    def addresses(self) -> list[str]:
        """Every bound address as a URL, e.g. `tcp://127.0.0.1:12000`, `tcp://[::1]:12000`."""
        return ["tcp://" + format_address(address) for address in self._bound]

    @property
    def is_serving(self) -> bool:
        """True from `start()` until `close()` begins."""
        return bool(self._servers) and not self._closing

    @property
    def stats(self) -> Stats:
        """Counters right now: closed connections' totals plus the open connections' so far."""
        bytes_in = self._closed_bytes_in
        bytes_out = self._closed_bytes_out
        for connection in self._connections:
            bytes_in += connection.bytes_in
            bytes_out += connection.bytes_out - connection.transport.get_write_buffer_size()
        return Stats(
            connections_active=len(self._connections),
            connections_total=self._connections_total,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
        )

    def _first_socket_address(self) -> Any:
        if not self._bound:
            raise RuntimeError("EchoServer is not started")
        return self._bound[0]

    # -- connections ---------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, not a coroutine: start_server then creates no Task per connection.
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        transport = cast(asyncio.Transport, writer.transport)
        connection = EchoConnection(self, transport, writer)
        transport.set_protocol(connection)
        transport.set_write_buffer_limits(high=self.config.write_buffer_high)
        self._connections.add(connection)
        self._connections_total += 1
        self._idle.clear()
        self._log.debug("connection opened", peer=format_address(connection.peer))
        if self._closing:
            connection.begin_shutdown()

    def connection_closed(self, connection: EchoConnection) -> None:
        self._connections.discard(connection)
        self._closed_bytes_in += connection.bytes_in
        self._closed_bytes_out += connection.bytes_out
        self._log.info("connection closed", **connection.record())
        if not self._connections:
            self._idle.set()
