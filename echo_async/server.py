"""EchoServer: runs one ServerConfig's listeners, tracks its connections, shuts down gracefully.

The server never touches process-wide state: no event loop policy, no signal handlers, no logging
configuration. It logs through `structlog.get_logger("echo_async")`; the host application decides
where those records go.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import structlog

from echo_async.config import WORKER_ENVIRONMENT_VARIABLE, ServerConfig
from echo_async.connection import (
    LINGER_S,
    REASON_LIMIT,
    REASON_PROXY_HEADER,
    REASON_SHUTDOWN,
    EchoConnection,
    ReadBuffer,
    format_address,
)
from echo_async.faults import FaultPlan, FaultyConnection
from echo_async.limits import Admission, DescriptorWatch, Sweeper, sweep_interval
from echo_async.listeners import is_loopback
from echo_async.metrics import SYNC_INTERVAL_S, ServerMetrics, TransportTotals
from echo_async.proxy_protocol import is_trusted, parse_networks
from echo_async.sites import Site, open_site

LOGGER_NAME = "echo_async"
REASON_TLS_HANDSHAKE = "tls_handshake"


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a server's counters since it started (bytes include UDP datagrams)."""

    connections_active: int
    connections_total: int
    bytes_in: int
    bytes_out: int
    connections_rejected: int = 0
    datagrams_in: int = 0
    datagrams_out: int = 0
    datagrams_dropped: int = 0


class EchoServer:
    """An RFC 862 echo server on the running event loop, over every listener in its config.

    Use it as `async with EchoServer(config) as server:`; leaving the block closes it gracefully.
    Or call `await start()` and later `await close()`. `sockets` are already-bound listening TCP
    sockets to serve instead of `config`'s listeners (systemd socket activation, a supervisor's
    shared socket). `metrics` receives the server's counters.
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
        self._sites: list[Site] = []
        self._tls_context: ssl.SSLContext | None = None
        self._connections: set[EchoConnection] = set()
        self._reads = ReadBuffer()
        self._admission = Admission(self.config)
        self._descriptors = DescriptorWatch()
        self._sweeper = Sweeper(sweep_interval(self.config), self._sweep)
        self._metrics_due = 0.0
        self._fault_plan = FaultPlan(self.config) if self.config.faults_enabled else None
        self._greetings: dict[Any, bytes] = {}
        self._proxy_networks = (
            parse_networks(self.config.proxy_trusted)
            if self.config.proxy_protocol != "off"
            else None
        )
        self._opened: dict[str, int] = {}
        self._closed_bytes: dict[str, list[int]] = {}
        self._connections_rejected = 0
        self._started_at = 0.0
        self._started = False
        self._closing = False
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._log: Any = structlog.get_logger(LOGGER_NAME)
        self._log_opens = True

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener and start serving.

        Raises OSError when an address can't be bound and ConfigError for a bad certificate or
        a Unix socket path in use; either way nothing is left listening.
        """
        if self._started:
            raise RuntimeError("EchoServer already started")
        self._started = True
        # Bound here, not at import, so the host's logging configuration applies.
        self._log = structlog.get_logger(LOGGER_NAME).bind()
        enabled = getattr(self._log, "is_enabled_for", None)
        # Per connection, the open record's formatting costs as much as the record: skip both
        # when debug records are filtered out anyway.
        self._log_opens = enabled(logging.DEBUG) if callable(enabled) else True
        config = self.config
        listeners = config.listeners
        if any(listener.scheme == "tls" for listener in listeners):
            from echo_async.tls import server_context

            self._tls_context = server_context(config, self._handshake_failed)
        try:
            if self._sockets:
                for sock in self._sockets:
                    site = await open_site(
                        listeners[0].with_port(0), config, self._handler("tcp"), self._log, sock
                    )
                    self._sites.append(site)
            else:
                for listener in listeners:
                    try:
                        site = await open_site(
                            listener,
                            config,
                            self._handler(listener.scheme),
                            self._log,
                            ssl_context=self._tls_context if listener.scheme == "tls" else None,
                        )
                    except OSError as error:
                        if error.filename is not None:
                            raise
                        # Name the listener that failed (asyncio's message has only an address).
                        raise OSError(error.errno, error.strerror, listener.url) from error
                    self._sites.append(site)
                    if listener.scheme == "udp" and not is_loopback(listener.host):
                        self._log.warning(
                            "UDP echo listening beyond loopback: it can be abused for "
                            "reflection; rate limits and loop protection apply",
                            address=site.addresses[0],
                            udp_rate=config.udp_rate,
                        )
        except BaseException:
            for site in self._sites:
                site.close()
            for site in self._sites:
                await site.wait_closed()
            self._sites.clear()
            raise
        self._started_at = time.monotonic()
        self._sweeper.start()
        self._log.info("listening", addresses=self.addresses)

    def _handler(self, scheme: str) -> Any:
        return functools.partial(self._accept, scheme)

    async def serve_forever(self) -> None:
        """Wait until the server is closed (by `close()` elsewhere, or by leaving `async with`)."""
        if not self._sites:
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
            for site in self._sites:
                site.close()
            if self._connections:
                self._log.info(
                    "shutting down",
                    connections_open=len(self._connections),
                    shutdown_timeout_s=deadline_s,
                )
            aborted = await self._drain(deadline_s)
            self._sweeper.stop()
            for site in self._sites:
                await site.wait_closed()
            self._sync_metrics()
            for site in self._sites:
                if site.datagram is not None:
                    self._log.info(
                        "udp summary", address=site.addresses[0], **site.datagram.summary()
                    )
            stats = self.stats
            self._log.info(
                "server closed",
                connections_total=stats.connections_total,
                connections_rejected=stats.connections_rejected,
                bytes_in=stats.bytes_in,
                bytes_out=stats.bytes_out,
                aborted_at_shutdown=aborted,
                uptime_s=round(time.monotonic() - self._started_at, 3) if self._sites else 0.0,
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
        return str(self._first_address()[0])

    @property
    def port(self) -> int:
        """The port of the first bound address (the one the OS picked when the config says 0)."""
        return int(self._first_address()[1])

    @property
    def addresses(self) -> list[str]:
        """Every bound address as a URL: `tcp://127.0.0.1:12000`, `udp://[::1]:7`, `unix:///p`."""
        return [address for site in self._sites for address in site.addresses]

    @property
    def is_serving(self) -> bool:
        """True from `start()` until `close()` begins (what /healthz reports)."""
        return bool(self._sites) and not self._closing

    @property
    def stats(self) -> Stats:
        """Counters right now: closed connections' totals plus the open connections' so far."""
        totals = self.transport_totals()
        datagrams = [site.datagram for site in self._sites if site.datagram is not None]
        return Stats(
            connections_active=sum(t.active for t in totals.values()),
            connections_total=sum(t.total for t in totals.values()),
            bytes_in=sum(t.bytes_in for t in totals.values()),
            bytes_out=sum(t.bytes_out for t in totals.values()),
            connections_rejected=self._connections_rejected,
            datagrams_in=sum(d.datagrams_in for d in datagrams),
            datagrams_out=sum(d.datagrams_out for d in datagrams),
            datagrams_dropped=sum(sum(d.dropped.values()) for d in datagrams),
        )

    def transport_totals(self) -> dict[str, TransportTotals]:
        """Counters per transport (`tcp`, `tls`, `unix`, `udp`), for metrics."""
        active: dict[str, int] = {}
        live: dict[str, list[int]] = {}
        for connection in self._connections:
            kind = connection.kind
            active[kind] = active.get(kind, 0) + 1
            sums = live.setdefault(kind, [0, 0])
            sums[0] += connection.bytes_in
            sums[1] += connection.bytes_out - connection.transport.get_write_buffer_size()
        totals = {}
        for kind in set(self._opened) | set(live):
            closed = self._closed_bytes.get(kind, [0, 0])
            sums = live.get(kind, [0, 0])
            totals[kind] = TransportTotals(
                active.get(kind, 0),
                self._opened.get(kind, 0),
                closed[0] + sums[0],
                closed[1] + sums[1],
            )
        for site in self._sites:
            if site.datagram is not None:
                previous = totals.get("udp", TransportTotals(0, 0, 0, 0))
                totals["udp"] = TransportTotals(
                    0,
                    0,
                    previous.bytes_in + site.datagram.bytes_in,
                    previous.bytes_out + site.datagram.bytes_out,
                )
        return totals

    def _first_address(self) -> Any:
        for site in self._sites:
            for address in site.bound:
                if isinstance(address, tuple):
                    return address
        raise RuntimeError("EchoServer is not started or has no IP listener")

    # -- connections ---------------------------------------------------------------------------

    def _accept(self, kind: str, reader: asyncio.StreamReader, writer: Any) -> None:
        # A plain function, not a coroutine: start_server then creates no Task per connection.
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        transport = cast(asyncio.Transport, writer.transport)
        if self._closing:
            # Accepted by the kernel before close() stopped the listener: not served.
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        host = _host_of(peer)
        if not self._admit(transport, peer, host):
            return
        connection: EchoConnection
        if self._fault_plan is None:
            connection = EchoConnection(
                self, transport, writer, peer, self.config.max_bytes, kind, self._reads
            )
        else:
            serial = sum(self._opened.values())
            connection = FaultyConnection(
                self,
                transport,
                writer,
                peer,
                self.config.max_bytes,
                kind,
                self._reads,
                plan=self._fault_plan,
                serial=serial,
            )
        connection.admitted_host = host
        transport.set_protocol(connection)
        if self._proxy_networks is not None and kind != "unix":
            if is_trusted(host, self._proxy_networks):
                connection.expect_proxy_header(self.config.proxy_protocol == "required")
            elif self.config.proxy_protocol == "required":
                self._register(connection, greet=False)
                self.proxy_rejected(connection, "PROXY header from an untrusted source")
                return
        self._register(connection)

    def _admit(self, transport: asyncio.Transport, peer: Any, host: str) -> bool:
        rejection = self._admission.admit(len(self._connections), host)
        if rejection is None:
            return True
        transport.close()
        self._connections_rejected += 1
        if self.metrics is not None:
            self.metrics.rejected(rejection)
        self._log.info(
            "connection rejected",
            peer=format_address(peer),
            local=format_address(transport.get_extra_info("sockname")),
            bytes_in=0,
            bytes_out=0,
            duration_s=0.0,
            reason=REASON_LIMIT,
            limit=rejection,
        )
        return False

    def _register(self, connection: EchoConnection, greet: bool = True) -> None:
        connection.transport.set_write_buffer_limits(high=self.config.write_buffer_high)
        if greet and self.config.greeting:
            connection.transport.write(self._greeting(connection.local))
        self._connections.add(connection)
        self._opened[connection.kind] = self._opened.get(connection.kind, 0) + 1
        self._idle.clear()
        if self._log_opens:
            self._log.debug("connection opened", peer=format_address(connection.peer))

    def proxy_rejected(self, connection: EchoConnection, detail: str) -> None:
        self._connections_rejected += 1
        if self.metrics is not None:
            self.metrics.rejected(REASON_PROXY_HEADER)
        connection.reject(REASON_PROXY_HEADER, detail)

    def _greeting(self, local: Any) -> bytes:
        greeting = self._greetings.get(local)
        if greeting is None:
            port = local[1] if isinstance(local, tuple) else ""
            text = self.config.greeting.format(
                hostname=socket.gethostname(),
                pid=os.getpid(),
                port=port,
                worker=os.environ.get(WORKER_ENVIRONMENT_VARIABLE, "0"),
            )
            greeting = self._greetings[local] = text.encode("utf-8") + b"\n"
        return greeting

    def _handshake_failed(self, detail: str) -> None:
        # Called from inside the loop's TLS layer, which knows no peer address at that point.
        self._connections_rejected += 1
        if self.metrics is not None:
            self.metrics.rejected(REASON_TLS_HANDSHAKE)
        self._log.info("tls handshake failed", reason=REASON_TLS_HANDSHAKE, error=detail)

    def connection_closed(self, connection: EchoConnection) -> None:
        self._connections.discard(connection)
        self._admission.release(connection.admitted_host)
        closed = self._closed_bytes.setdefault(connection.kind, [0, 0])
        closed[0] += connection.bytes_in
        closed[1] += connection.bytes_out
        record = connection.record()
        if self.metrics is not None:
            self.metrics.closed(connection.kind, record["duration_s"])
            for kind, count in record.get("faults_injected", {}).items():
                self.metrics.faults(kind, count)
        self._log.info("connection closed", **record)
        if not self._connections:
            self._idle.set()

    def _sweep(self) -> None:
        now = time.monotonic()
        config = self.config
        proxy_deadline = now - config.proxy_header_timeout
        for connection in list(self._connections):
            if connection.proxy_parser is not None and connection.opened_at <= proxy_deadline:
                connection.proxy_timed_out()
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
        for site in self._sites:
            if site.datagram is not None and len(site.datagram.buckets) > 1024:
                site.datagram.prune(now)
        if self.metrics is not None and now >= self._metrics_due:
            self._metrics_due = now + SYNC_INTERVAL_S
            self._sync_metrics()

    def _sync_metrics(self) -> None:
        if self.metrics is None:
            return
        datagrams = [site.datagram for site in self._sites if site.datagram is not None]
        dropped: dict[str, int] = {}
        for datagram in datagrams:
            for reason, count in datagram.dropped.items():
                dropped[reason] = dropped.get(reason, 0) + count
        self.metrics.sync(
            self.transport_totals(),
            datagrams_in=sum(d.datagrams_in for d in datagrams),
            datagrams_out=sum(d.datagrams_out for d in datagrams),
            datagrams_dropped=dropped,
        )


def _host_of(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""
