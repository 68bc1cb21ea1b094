"""EchoServer: runs one ServerConfig's listeners, tracks its connections, shuts down gracefully.

The server never touches process-wide state: no event loop policy, no signal handlers, no logging
configuration. It logs through `structlog.get_logger("echo_async")`; the host application decides
where those records go.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import structlog

from echo_async.config import ServerConfig
from echo_async.connection import (
    LINGER_S,
    REASON_LIMIT,
    REASON_SHUTDOWN,
    EchoConnection,
    format_address,
)
from echo_async.limits import Admission, DescriptorWatch, Sweeper, sweep_interval
from echo_async.metrics import SYNC_INTERVAL_S, ServerMetrics

LOGGER_NAME = "echo_async"


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a server's counters since it started."""

    connections_active: int
    connections_total: int
    bytes_in: int
    bytes_out: int
    connections_rejected: int = 0


class EchoServer:
    """An RFC 862 echo server on the running event loop.

    Use it as `async with EchoServer(config) as server:`; leaving the block closes it gracefully.
    Or call `await start()` and later `await close()`. `sockets` are already-bound listening
    sockets to serve instead of binding `config.host`/`config.port` (systemd socket activation,
    a supervisor's shared socket). `metrics` receives the server's counters.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        sockets: Sequence[socket.socket] = (),
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self.metrics = metrics
        self._sockets = list(sockets)
        self._servers: list[asyncio.Server] = []
        self._bound: list[Any] = []
        self._connections: set[EchoConnection] = set()
        self._admission = Admission(self.config)
        self._descriptors = DescriptorWatch()
        self._sweeper = Sweeper(sweep_interval(self.config), self._sweep)
        self._metrics_due = 0.0
        self._connections_total = 0
        self._connections_rejected = 0
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
        try:
            if self._sockets:
                for sock in self._sockets:
                    self._servers.append(
                        await asyncio.start_server(self._accept, sock=sock, backlog=config.backlog)
                    )
            else:
                self._servers.append(
                    await asyncio.start_server(
                        self._accept,
                        host=config.host,
                        port=config.port,
                        backlog=config.backlog,
                        reuse_address=True,
                        reuse_port=config.reuse_port or None,
                    )
                )
        except BaseException:
            for server in self._servers:
                server.close()
            self._servers.clear()
            raise
        self._bound = [sock.getsockname() for server in self._servers for sock in server.sockets]
        self._started_at = time.monotonic()
        self._sweeper.start()
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
            if self._connections:
                self._log.info(
                    "shutting down",
                    connections_open=len(self._connections),
                    shutdown_timeout_s=deadline_s,
                )
            aborted = await self._drain(deadline_s)
            self._sweeper.stop()
            for server in self._servers:
                await server.wait_closed()
            self._sync_metrics()
            stats = self.stats
            self._log.info(
                "server closed",
                connections_total=stats.connections_total,
                connections_rejected=stats.connections_rejected,
                bytes_in=stats.bytes_in,
                bytes_out=stats.bytes_out,
                aborted_at_shutdown=aborted,
                uptime_s=round(time.monotonic() - self._started_at, 3) if self._servers else 0.0,
            )
        finally:
            self._sweeper.stop()
            self._closed.set()

    async def _drain(self, timeout: float) -> int:
        """Finish every connection, wait for them to end, abort the rest at the deadline."""
        deadline = time.monotonic() + timeout
        for connection in list(self._connections):
            connection.finish(REASON_SHUTDOWN, deadline)
        while self._connections:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._idle.wait(), min(LINGER_S / 2, remaining))
            except TimeoutError:
                now = time.monotonic()
                for connection in list(self._connections):
                    connection.sweep(now, 0.0, 0.0)
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
        return self._first_address()[0]  # type: ignore[no-any-return]

    @property
    def port(self) -> int:
        """The port of the first bound address (the one the OS picked when the config says 0)."""
        return self._first_address()[1]  # type: ignore[no-any-return]

    @property
    def addresses(self) -> list[str]:
        """Every bound address as a URL, e.g. `tcp://127.0.0.1:12000`, `tcp://[::1]:12000`."""
        return ["tcp://" + format_address(address) for address in self._bound]

    @property
    def is_serving(self) -> bool:
        """True from `start()` until `close()` begins (what /healthz reports)."""
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
            connections_rejected=self._connections_rejected,
        )

    def _first_address(self) -> Any:
        if not self._bound:
            raise RuntimeError("EchoServer is not started")
        return self._bound[0]

    # -- connections ---------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, not a coroutine: start_server then creates no Task per connection.
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        transport = cast(asyncio.Transport, writer.transport)
        peer = transport.get_extra_info("peername")
        rejection = self._admission.admit(len(self._connections), _host_of(peer))
        if rejection is not None:
            self._reject(transport, peer, rejection)
            return
        connection = EchoConnection(self, transport, writer, peer, self.config.max_bytes)
        transport.set_protocol(connection)
        transport.set_write_buffer_limits(high=self.config.write_buffer_high)
        self._connections.add(connection)
        self._connections_total += 1
        self._idle.clear()
        self._log.debug("connection opened", peer=format_address(peer))
        if self._closing:
            connection.finish(REASON_SHUTDOWN, time.monotonic() + LINGER_S)

    def _reject(self, transport: asyncio.Transport, peer: Any, reason: str) -> None:
        transport.close()
        self._connections_rejected += 1
        if self.metrics is not None:
            self.metrics.rejected(reason)
        self._log.info(
            "connection rejected",
            peer=format_address(peer),
            local=format_address(transport.get_extra_info("sockname")),
            bytes_in=0,
            bytes_out=0,
            duration_s=0.0,
            reason=REASON_LIMIT,
            limit=reason,
        )

    def connection_closed(self, connection: EchoConnection) -> None:
        self._connections.discard(connection)
        self._admission.release(_host_of(connection.peer))
        self._closed_bytes_in += connection.bytes_in
        self._closed_bytes_out += connection.bytes_out
        record = connection.record()
        if self.metrics is not None:
            self.metrics.closed(record["duration_s"])
        self._log.info("connection closed", **record)
        if not self._connections:
            self._idle.set()

    def _sweep(self) -> None:
        now = time.monotonic()
        config = self.config
        for connection in list(self._connections):
            connection.sweep(now, config.idle_timeout, config.max_lifetime)
        change = self._descriptors.check()
        if change == "exhausted":
            self._log.warning(
                "out of file descriptors; new connections are dropped until some close",
                connections_open=len(self._connections),
                episode=self._descriptors.episodes,
            )
        elif change == "recovered":
            self._log.info(
                "file descriptors available again; accepting",
                episode=self._descriptors.episodes,
            )
        if self.metrics is not None and now >= self._metrics_due:
            self._metrics_due = now + SYNC_INTERVAL_S
            self._sync_metrics()

    def _sync_metrics(self) -> None:
        if self.metrics is not None:
            stats = self.stats
            self.metrics.sync(
                stats.connections_active, stats.connections_total, stats.bytes_in, stats.bytes_out
            )


def _host_of(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""
