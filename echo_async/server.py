"""EchoServer: starts one ServerConfig's listeners, closes them gracefully, reports stats.

The server never touches process-wide state: no event loop policy, no signal handlers, no logging
configuration. Its records follow the host application: structlog when the host configured it, else
the stdlib `logging` logger `echo_async` (`logs.library_logger`). What happens to a connection,
from accept to its close record, is `ServerState`'s (state.py); the server holds one Site per
listener (sites.py).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from echo_async.config import ServerConfig
from echo_async.limits import Sweeper, sweep_interval
from echo_async.listeners import TLS_SCHEMES, WEBSOCKET_SCHEMES, Listener, is_loopback
from echo_async.metrics import SYNC_INTERVAL_S, ServerMetrics, TransportTotals
from echo_async.sites import Site, StreamHandler, open_inherited_site, open_site
from echo_async.state import LOGGER_NAME, ServerState

__all__ = ["LOGGER_NAME", "EchoServer", "Stats"]

# After the drain, how long close() lets listeners finish closing when no time is left.
_LISTENER_GRACE_S = 0.1


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a server's counters since it started (bytes include UDP datagrams)."""

    connections_active: int
    """Connections open now (TCP, TLS and Unix; UDP has none)."""
    connections_total: int
    """Connections served since start, open ones included."""
    bytes_in: int
    """Bytes received from clients: stream payload and UDP datagrams."""
    bytes_out: int
    """Bytes echoed back to clients: stream payload and UDP datagrams."""
    connections_rejected: int = 0
    """Connections refused: over a connection limit, a missing or bad PROXY header, a failed
    TLS handshake."""
    datagrams_in: int = 0
    """UDP datagrams received."""
    datagrams_out: int = 0
    """UDP datagrams echoed."""
    datagrams_dropped: int = 0
    """UDP datagrams not answered: rate limit, loop protection, backpressure, injected faults."""


class EchoServer:
    """An RFC 862 echo server on the running event loop, over every listener in its config.

    Use it as `async with EchoServer(config) as server:`; leaving the block closes it gracefully.
    Or call `await start()` and later `await close()`. `sockets` are already-bound sockets to
    serve instead of `config`'s listeners (systemd socket activation): each is served as the
    kind of listener it is (TCP, TLS, Unix, UDP; see `sites.inherited_listener`). `metrics`
    receives the server's counters.
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
        self._state = ServerState(self.config, metrics)
        self._sweeper = Sweeper(sweep_interval(self.config), self._tick)
        self._metrics_due = 0.0
        self._started_at = 0.0
        self._started = False
        self._closing = False
        self._closed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener and start serving.

        Raises OSError when an address can't be bound and ConfigError for a bad certificate or
        a Unix socket path in use; either way nothing is left listening.
        """
        if self._started:
            raise RuntimeError("EchoServer already started")
        self._started = True
        state = self._state
        state.bind_logger()
        log = state.log
        config = self.config
        if any(listener.scheme in TLS_SCHEMES for listener in config.listeners):
            from echo_async.tls import server_context

            state.tls_context = server_context(config)
        try:
            if self._sockets:
                for sock in self._sockets:
                    site = await open_inherited_site(sock, config, self._handler, log)
                    self._sites.append(site)
            else:
                for listener in config.listeners:
                    try:
                        site = await open_site(listener, config, self._handler, log)
                    except OSError as error:
                        if error.filename is not None:
                            raise
                        # Name the listener that failed (asyncio's message has only an address).
                        raise OSError(error.errno, error.strerror, listener.url) from error
                    self._sites.append(site)
            for site in self._sites:
                if site.datagram is not None and not is_loopback(site.listener.host):
                    log.warning(
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
                site.remove_files()
            self._sites.clear()
            raise
        self._started_at = time.monotonic()
        self._sweeper.start()
        log.info("listening", addresses=self.addresses)

    def _handler(self, listener: Listener) -> StreamHandler:
        if listener.scheme in WEBSOCKET_SCHEMES:
            return functools.partial(self._state.accept, listener.scheme, path=listener.path)
        return functools.partial(self._state.accept, listener.scheme)

    async def serve_forever(self) -> None:
        """Wait until the server is closed (by `close()` elsewhere, or by leaving `async with`)."""
        if not self._sites:
            raise RuntimeError("EchoServer is not started")
        await self._closed.wait()

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting, let open connections finish echoing, abort the rest after `timeout` s.

        Every byte the server had received from a client when the close began is echoed back,
        then the client gets EOF; bytes that arrive after that are read and dropped. Connections
        still open at the deadline (clients that stopped reading, TLS handshakes in flight) are
        aborted, and close() returns by then. `timeout` defaults to the configuration's
        `shutdown_timeout`.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        timeout_s = self.config.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout_s
        state = self._state
        try:
            if any([site.stop_polling() for site in self._sites]):
                for _ in range(2):  # let accepted sockets get their transports (see sites.py)
                    await asyncio.sleep(0)
            for site in self._sites:
                site.close()
            if state.connections:
                state.log.info(
                    "shutting down",
                    connections_open=len(state.connections),
                    shutdown_timeout_s=timeout_s,
                )
            aborted = await state.drain(deadline)
            self._sweeper.stop()
            # Python 3.12+ waits here for every transport a listener accepted: all the sites
            # together, within what is left of the deadline (or a short grace after it).
            waits = [asyncio.ensure_future(site.wait_closed()) for site in self._sites]
            if waits:
                remaining = max(deadline - time.monotonic(), _LISTENER_GRACE_S)
                _, pending = await asyncio.wait(waits, timeout=remaining)
                for wait in pending:
                    wait.cancel()
                if pending:
                    state.log.warning("listeners did not close in time", count=len(pending))
            for site in self._sites:
                site.remove_files()
            failure = state.flush_records()
            if failure is not None:
                state.log.warning("close records or metrics failed", error=str(failure))
            self._sync_metrics()
            for site in self._sites:
                if site.datagram is not None:
                    state.log.info(
                        "udp summary", address=site.addresses[0], **site.datagram.summary()
                    )
            stats = self.stats
            state.log.info(
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

    def abort_connections(self) -> None:
        """Abort every open connection now (reason `shutdown`); used to cut a drain short."""
        self._state.abort_all()

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
            connections_rejected=self._state.rejected,
            datagrams_in=sum(d.datagrams_in for d in datagrams),
            datagrams_out=sum(d.datagrams_out for d in datagrams),
            datagrams_dropped=sum(sum(d.dropped.values()) for d in datagrams),
        )

    def transport_totals(self) -> dict[str, TransportTotals]:
        """Counters per transport (`tcp`, `tls`, `unix`, `ws`, `wss`, `udp`), for metrics."""
        totals = self._state.transport_totals()
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

    # -- the sweep -----------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        self._state.sweep(now)
        for site in self._sites:
            if site.datagram is not None and len(site.datagram.buckets) > 1024:
                site.datagram.prune(now)
        if self.metrics is not None and now >= self._metrics_due:
            # The sweep's timer runs on the loop's clock, which can fire a hair before
            # time.monotonic() reaches the due time (uvloop): half a sweep of slack keeps the
            # sync at every SYNC_INTERVAL_S instead of every other one.
            self._metrics_due = now + SYNC_INTERVAL_S - self._sweeper.interval / 2
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
