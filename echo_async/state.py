"""ServerState: one server's connections, from accept to close record.

It owns the set of open connections (TLS handshakes and PROXY headers in progress included),
admission against the limits, the TLS upgrade tasks, the accounting behind `Stats` and metrics,
the periodic sweep of timers and the drain at shutdown. `EchoServer` owns the listeners and
calls in here; a connection (`connection.py`) reports its transitions back through the
`ConnectionOwner` methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from typing import Any, cast

from echo_async.config import WORKER_ENVIRONMENT_VARIABLE, ServerConfig
from echo_async.connection import (
    LINGER_S,
    REASON_LIMIT,
    REASON_PROXY_HEADER,
    REASON_SHUTDOWN,
    REASON_TLS_HANDSHAKE,
    EchoConnection,
    ReadBuffer,
    State,
    format_address,
)
from echo_async.faults import FaultPlan, FaultyConnection
from echo_async.limits import Admission, DescriptorWatch
from echo_async.listeners import TLS_SCHEMES, WEBSOCKET_SCHEMES
from echo_async.logs import library_logger
from echo_async.metrics import ServerMetrics, TransportTotals
from echo_async.proxy_protocol import is_trusted, parse_networks
from echo_async.tls import handshake_error, upgrade

LOGGER_NAME = "echo_async"
# After aborting what the deadline left, how long close() lets the loop deliver connection_lost.
ABORT_GRACE_S = 0.1
# Close records wait at most this long, and at most this many, to be made in one batch.
RECORD_DELAY_S = 0.01
RECORD_BATCH_MAX = 1024


class ServerState:
    """The connections of one EchoServer and everything counted about them."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.connections: set[EchoConnection] = set()
        self.tls_context: ssl.SSLContext | None = None
        self.log: Any = library_logger(LOGGER_NAME)
        self.log_opens = True
        self.log_closes = True
        self._closed_records: list[tuple[EchoConnection, float, str, dict[str, str]]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self.opened: dict[str, int] = {}
        self.closed_bytes: dict[str, list[int]] = {}
        self.rejected = 0
        self._accepted = 0
        self.closing = False
        self.closed = False
        self.drain_deadline = 0.0
        self.idle = asyncio.Event()
        self.idle.set()
        self.descriptors = DescriptorWatch()
        self._reads = ReadBuffer()
        self._admission = Admission(config)
        self._handshakes: set[asyncio.Task[None]] = set()
        self._fault_plan = FaultPlan(config) if config.faults_enabled else None
        self._greetings: dict[Any, bytes] = {}
        self._proxy_networks = (
            parse_networks(config.proxy_trusted) if config.proxy_protocol != "off" else None
        )

    def bind_logger(self) -> None:
        """Take the logger now (at start), so the host's logging configuration applies.

        structlog's when the host configured structlog, else the stdlib logger `echo_async`
        (see `logs.library_logger`); nothing is configured here either way.
        """
        self.log = library_logger(LOGGER_NAME)
        enabled = getattr(self.log, "is_enabled_for", None)
        # Per connection, the open record's formatting costs as much as the record: skip both
        # when debug records are filtered out anyway.
        self.log_opens = enabled(logging.DEBUG) if callable(enabled) else True
        # Likewise the close record at info level (--log-level warning).
        self.log_closes = enabled(logging.INFO) if callable(enabled) else True

    # -- accept --------------------------------------------------------------------------------

    def accept(self, kind: str, reader: asyncio.StreamReader, writer: Any, path: str = "/") -> None:
        """The `start_server` handler: admit the socket, then header, handshake, echo.

        A plain function, not a coroutine: start_server then creates no Task per connection.
        uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        `path` is the request path a ws:// or wss:// listener serves.
        """
        transport = cast(asyncio.Transport, writer.transport)
        if self.closed:
            # Accepted by the kernel after close() returned: nobody is left to drain it.
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else ""
        rejection = self._admission.admit(len(self.connections), host)
        if rejection is not None:
            self._refuse(kind, transport, peer, rejection)
            return
        connection: EchoConnection
        if self._fault_plan is None:
            connection = EchoConnection(
                self, transport, writer, peer, self.config.max_bytes, kind, self._reads
            )
        else:
            connection = FaultyConnection(
                self,
                transport,
                writer,
                peer,
                self.config.max_bytes,
                kind,
                self._reads,
                plan=self._fault_plan,
                serial=self._accepted,
            )
        connection.admitted_host = host
        if kind in WEBSOCKET_SCHEMES:
            from echo_async.websocket import WebSocketSession

            connection.websocket = WebSocketSession(connection, path, self.config.ws_max_message)
        self._accepted += 1
        self.connections.add(connection)
        self.idle.clear()
        transport.set_protocol(connection)
        if self._proxy_networks is not None and kind != "unix":
            if is_trusted(host, self._proxy_networks):
                connection.expect_proxy_header(self.config.proxy_protocol == "required")
            elif self.config.proxy_protocol == "required":
                connection.reject(REASON_PROXY_HEADER, "PROXY header from an untrusted source")
            else:
                self.header_ended(connection, b"")
        elif kind in TLS_SCHEMES:
            self.header_ended(connection, b"")
        elif connection.websocket is not None:
            connection.open()  # counted as opened once its WebSocket handshake succeeds
        else:
            self.connection_opened(connection)
        if self.closing:
            # Accepted while draining: it is served like the others, finished at once.
            connection.finish(REASON_SHUTDOWN, self.drain_deadline)

    def _refuse(self, kind: str, transport: asyncio.Transport, peer: Any, rejection: str) -> None:
        transport.close()
        self.rejected += 1
        if self.metrics is not None:
            self.metrics.rejected(rejection)
        self.log.info(
            "connection rejected",
            transport=kind,
            peer=format_address(peer),
            local=format_address(transport.get_extra_info("sockname")),
            bytes_in=0,
            bytes_out=0,
            duration_s=0.0,
            reason=REASON_LIMIT,
            limit=rejection,
        )

    # -- what connections report (ConnectionOwner) ---------------------------------------------

    def header_ended(self, connection: EchoConnection, payload: bytes) -> None:
        """After the PROXY header (or at once): TLS handshake for tls://, else echo `payload`."""
        if connection.kind not in TLS_SCHEMES:
            connection.open()
            if payload:
                connection.data_received(payload)
            return
        if self.tls_context is None:  # pragma: no cover - EchoServer builds it for tls://
            raise RuntimeError("a tls:// connection without a TLS context")
        # Nothing more may be read as plain bytes: from here on the TLS layer reads.
        connection.transport.pause_reading()
        connection.state = State.HANDSHAKE
        connection.byte_limit = -1
        connection.early = bytearray(payload)
        task = asyncio.get_running_loop().create_task(self._handshake(connection, self.tls_context))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, connection: EchoConnection, context: ssl.SSLContext) -> None:
        plain = connection.transport
        timeout = self.config.tls_handshake_timeout
        error: BaseException | None = None
        transport = None
        try:
            transport = await upgrade(plain, connection, context, timeout, connection.take_early)
        except asyncio.CancelledError as cancelled:
            error = cancelled
        except Exception as failure:
            error = failure
        if transport is None:
            plain.abort()
            self._handshake_failed(connection, handshake_error(error, timeout))
            if isinstance(error, asyncio.CancelledError):
                raise error
            return
        self.handshake_done(connection, transport)

    def handshake_done(self, connection: EchoConnection, transport: asyncio.Transport) -> None:
        """Open a tls:// connection (from the handshake task, or its first decrypted data)."""
        if connection.state is not State.HANDSHAKE:
            return
        connection.transport = transport
        connection.open()
        if self.closing or connection.close_reason is not None:
            connection.finish(REASON_SHUTDOWN, self.drain_deadline)

    def _handshake_failed(self, connection: EchoConnection, detail: str) -> None:
        if connection.state is State.CLOSED:
            return
        connection.state = State.CLOSED
        connection.early = None
        if connection.close_reason is None:
            connection.close_reason = REASON_TLS_HANDSHAKE
            self.rejected += 1
            try:
                self.connection_closed(connection, "tls handshake failed", error=detail)
            finally:
                if self.metrics is not None:
                    self.metrics.rejected(REASON_TLS_HANDSHAKE)
        else:
            # Ended by the server (shutdown) mid-handshake.
            self.connection_closed(connection, "connection closed", error=detail)

    def connection_opened(self, connection: EchoConnection) -> None:
        # Counted as served once it echoes: a connection refused for its PROXY header or its
        # TLS handshake counts as rejected only.
        kind = connection.kind
        self.opened[kind] = self.opened.get(kind, 0) + 1
        transport = connection.transport
        transport.set_write_buffer_limits(high=self.config.write_buffer_high)
        if self.config.greeting:
            connection.send_greeting(self._greeting(connection.local))
        if self.log_opens:
            self.log.debug(
                "connection opened", transport=connection.kind, peer=format_address(connection.peer)
            )

    def connection_rejected(self, connection: EchoConnection, reason: str, detail: str) -> None:
        self.rejected += 1
        if self.metrics is not None:
            self.metrics.rejected(reason)

    def connection_closed(
        self, connection: EchoConnection, event: str = "connection closed", **extra: str
    ) -> None:
        # The bookkeeping that close() waits on comes first and cannot fail; metrics and the
        # log record come after, so an error there (a full disk) cannot stall a shutdown.
        self.connections.discard(connection)
        self._admission.release(connection.admitted_host)
        closed = self.closed_bytes.setdefault(connection.kind, [0, 0])
        closed[0] += connection.bytes_in
        closed[1] += connection.bytes_out
        if not self.connections:
            self.idle.set()
        if not self.log_closes and self.metrics is None:
            return
        # Records (and their metrics) are made in batches, RECORD_DELAY_S after the first of
        # them: made one at a time between the kernel's work, a record costs about three times
        # what it costs in a batch, cold caches around the call (docs/performance.md).
        batch = self._closed_records
        batch.append((connection, time.monotonic(), event, extra))
        if len(batch) == 1:
            self._flush_handle = asyncio.get_running_loop().call_later(
                RECORD_DELAY_S, self._flush_on_time
            )
        elif len(batch) >= RECORD_BATCH_MAX:
            self._flush_on_time()

    def _flush_on_time(self) -> None:
        failure = self.flush_records()
        if failure is not None:
            raise failure  # reported by the loop's exception handler, once per batch

    def flush_records(self) -> Exception | None:
        """Update metrics and log every close record still waiting (see connection_closed).

        Every record is attempted; the first error (a full disk) is returned, not raised.
        """
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch = self._closed_records
        if not batch:
            return None
        self._closed_records = []
        metrics = self.metrics
        info = self.log.info if self.log_closes else None
        failure: Exception | None = None
        for connection, ended_at, event, extra in batch:
            kind = connection.kind
            record = connection.record(ended_at)
            record.update(extra)
            try:
                if metrics is not None:
                    metrics.closed(kind, record["duration_s"])
                    for fault, count in record.get("faults_injected", {}).items():
                        metrics.faults(fault, count)
            except Exception as error:  # a full disk under prometheus' multiprocess files
                failure = failure or error
            if info is not None:
                try:
                    info(event, **record)
                except Exception as error:
                    failure = failure or error
        return failure

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

    # -- timers --------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Run every connection's timers: PROXY header, idle, lifetime, finishing deadlines."""
        config = self.config
        proxy_deadline = now - config.proxy_header_timeout
        websocket_deadline = now - config.ws_handshake_timeout
        for connection in list(self.connections):
            if connection.state is State.HEADER and connection.opened_at <= proxy_deadline:
                connection.proxy_timed_out()
            websocket = connection.websocket
            if (
                websocket is not None
                and not websocket.opened
                and connection.state is State.OPEN
                and connection.opened_at <= websocket_deadline
            ):
                websocket.handshake_timed_out()
            connection.sweep(now, config.idle_timeout, config.max_lifetime)
        change = self.descriptors.check()
        if change == "exhausted":
            self.log.warning(
                "out of file descriptors; new connections are dropped until some close",
                connections_open=len(self.connections),
                episode=self.descriptors.episodes,
            )
        elif change == "recovered":
            self.log.info(
                "file descriptors available again; accepting", episode=self.descriptors.episodes
            )

    # -- shutdown ------------------------------------------------------------------------------

    async def drain(self, deadline: float) -> int:
        """Finish every connection, wait until `deadline` (monotonic), abort the rest.

        Returns how many were aborted. Never waits past the deadline by more than
        ABORT_GRACE_S, whatever the connections or the loop do.
        """
        self.closing = True
        self.drain_deadline = deadline
        for connection in list(self.connections):
            connection.finish(REASON_SHUTDOWN, deadline)
        while self.connections:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self.idle.wait(), min(LINGER_S / 2, remaining))
            except TimeoutError:
                now = time.monotonic()
                for connection in list(self.connections):
                    connection.sweep(now, 0.0, 0.0)
        aborted = len(self.connections)
        grace_deadline = max(deadline, time.monotonic()) + ABORT_GRACE_S
        try:
            if aborted:
                self.abort_all()
                # connection_lost arrives on the next loop iterations.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.idle.wait(), ABORT_GRACE_S)
                for connection in list(self.connections):
                    # Its transport never reported back: account for it anyway.
                    connection.state = State.CLOSED
                    connection.lost = True
                    try:
                        self.connection_closed(connection)
                    except Exception:
                        self.log.exception("accounting a closed connection failed")
        finally:
            self.closed = True
            await self._end_handshakes(grace_deadline)
        return aborted

    async def _end_handshakes(self, grace_deadline: float) -> None:
        tasks = list(self._handshakes)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(grace_deadline - time.monotonic(), 0.001))

    def abort_all(self) -> None:
        """Abort every open connection now (reason `shutdown`)."""
        for connection in list(self.connections):
            connection.abort(REASON_SHUTDOWN)

    # -- accounting ----------------------------------------------------------------------------

    def transport_totals(self) -> dict[str, TransportTotals]:
        """Stream counters per transport (`tcp`, `tls`, `unix`, `ws`, `wss`): closed plus open."""
        active: dict[str, int] = {}
        live: dict[str, list[int]] = {}
        for connection in self.connections:
            kind = connection.kind
            active[kind] = active.get(kind, 0) + 1
            sums = live.setdefault(kind, [0, 0])
            sums[0] += connection.bytes_in
            queued = connection.transport.get_write_buffer_size()
            # A ws:// queue holds frames, not payload: its bytes_out counts what was framed.
            sums[1] += connection.bytes_out - (queued if connection.websocket is None else 0)
        totals = {}
        for kind in set(self.opened) | set(self.closed_bytes) | set(live):
            closed = self.closed_bytes.get(kind, [0, 0])
            sums = live.get(kind, [0, 0])
            totals[kind] = TransportTotals(
                active.get(kind, 0),
                self.opened.get(kind, 0),
                closed[0] + sums[0],
                closed[1] + sums[1],
            )
        return totals
