"""Prometheus collectors for an EchoServer, and the /metrics and /healthz endpoint.

The byte path never touches a collector: `ServerMetrics.sync()` copies the server's own counters
(integers bumped per chunk) into Prometheus once a second and at shutdown. Only per-connection
events (a close observed in the duration histogram, a rejection) call prometheus_client directly.

With `--workers`, each worker writes its values to prometheus_client's multiprocess directory and
the supervisor serves their sum; a gauge's `multiprocess_mode="livesum"` counts only live workers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

DURATION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
SYNC_INTERVAL_S = 1.0
_REQUEST_TIMEOUT_S = 5.0
_MAX_REQUEST_LINE = 8192
# A whole request (line and headers) larger than this is answered 431 and closed, after at most
# this long (or this much) of reading and dropping what the client still sends.
_MAX_REQUEST_BYTES = 16 * 1024
_LINGER_S = 1.0
_LINGER_BYTES = 1024 * 1024


class TransportTotals(NamedTuple):
    """One transport's counters: open now, served in all, bytes in and out."""

    active: int
    total: int
    bytes_in: int
    bytes_out: int


class ServerMetrics:
    """The echo_* Prometheus collectors, on `registry` (never the global one unless passed).

    Pass one to `EchoServer(config, metrics=ServerMetrics(registry))`: the server keeps it up to
    date (its counters once a second and at close, closes and rejections as they happen); serve
    `registry` however your application exposes metrics. Per-connection series carry a
    `transport` label: tcp, tls, unix, ws, wss or udp.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections_active = Gauge(
            "echo_connections_active",
            "Connections open now.",
            ["transport"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.connections_total = Counter(
            "echo_connections",
            "Connections accepted and served.",
            ["transport"],
            registry=registry,
        )
        self.connections_rejected = Counter(
            "echo_connections_rejected",
            "Connections closed at once: a limit, or a failed TLS handshake.",
            ["reason"],
            registry=registry,
        )
        self.bytes_received = Counter(
            "echo_bytes_received", "Bytes received from clients.", ["transport"], registry=registry
        )
        self.bytes_sent = Counter(
            "echo_bytes_sent", "Bytes echoed to clients.", ["transport"], registry=registry
        )
        self.connection_duration = Histogram(
            "echo_connection_duration_seconds",
            "How long served connections stayed open.",
            ["transport"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.resource_errors = Counter(
            "echo_resource_errors",
            "Socket operations the kernel refused for lack of memory: ENOBUFS, ENOMEM.",
            ["errno"],
            registry=registry,
        )
        self.datagrams_received = Counter(
            "echo_datagrams_received", "UDP datagrams received.", registry=registry
        )
        self.datagrams_sent = Counter(
            "echo_datagrams_sent", "UDP datagrams echoed.", registry=registry
        )
        self.datagrams_dropped = Counter(
            "echo_datagrams_dropped",
            "UDP datagrams not answered: loop_port, own_address, rate, backpressure.",
            ["reason"],
            registry=registry,
        )
        self.faults_injected = Counter(
            "echo_faults_injected",
            "Faults injected on purpose (--fault-*): delay, chunk, rate, reset, drop.",
            ["kind"],
            registry=registry,
        )
        self._synced: dict[str, tuple[int, ...]] = {}

    def sync(
        self,
        totals: Mapping[str, TransportTotals],
        datagrams_in: int = 0,
        datagrams_out: int = 0,
        datagrams_dropped: Mapping[str, int] | None = None,
    ) -> None:
        """Bring the counters up to the server's own totals (which only ever grow)."""
        for transport, current in totals.items():
            if transport != "udp":
                self.connections_active.labels(transport=transport).set(current.active)
            self._advance(
                ("total", transport), current.total, self.connections_total.labels(transport)
            )
            self._advance(
                ("in", transport), current.bytes_in, self.bytes_received.labels(transport)
            )
            self._advance(("out", transport), current.bytes_out, self.bytes_sent.labels(transport))
        self._advance(("datagrams_in",), datagrams_in, self.datagrams_received)
        self._advance(("datagrams_out",), datagrams_out, self.datagrams_sent)
        for reason, count in (datagrams_dropped or {}).items():
            self._advance(("dropped", reason), count, self.datagrams_dropped.labels(reason))
            if reason == "fault":
                self._advance(("fault", "drop"), count, self.faults_injected.labels("drop"))

    def _advance(self, key: tuple[str, ...], value: int, counter: Any) -> None:
        name = "/".join(key)
        last = self._synced.get(name, (0,))[0]
        if value > last:
            counter.inc(value - last)
            self._synced[name] = (value,)

    def rejected(self, reason: str) -> None:
        self.connections_rejected.labels(reason=reason).inc()

    def resource_error(self, errno_name: str) -> None:
        self.resource_errors.labels(errno=errno_name).inc()

    def faults(self, kind: str, count: int) -> None:
        self.faults_injected.labels(kind=kind).inc(count)

    def closed(self, transport: str, duration_s: float) -> None:
        self.connection_duration.labels(transport=transport).observe(duration_s)


class MetricsEndpoint:
    """A minimal HTTP/1.1 responder on the running loop: GET /metrics and GET /healthz.

    `healthy()` decides /healthz: 200 while the service accepts, 503 while it drains. Requests
    are bounded (a line of at most 8 KiB, a request of at most 16 KiB, read within 5 s), so a
    hostile client costs one connection and a timeout, never the service.
    """

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, healthy: Callable[[], bool]
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.healthy = healthy
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._log: Any = structlog.get_logger("echo_async")

    async def start(self) -> None:
        """Bind; raises OSError when the address can't be bound."""
        self._log = structlog.get_logger("echo_async").bind()
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=_MAX_REQUEST_LINE, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._log.info("metrics listening", address=f"http://{self.host}:{self.port}/metrics")

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await asyncio.wait_for(self._respond(reader, writer), _REQUEST_TIMEOUT_S)
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        size = len(request_line)
        while line := await reader.readline():
            size += len(line)
            if size > _MAX_REQUEST_BYTES:
                # Headers are not needed, and a client that keeps sending them is not a
                # scraper: answer once and close rather than read for the whole timeout.
                writer.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                writer.write_eof()
                await _discard(reader)
                return
            if not line.strip():
                break
        parts = request_line.split()
        method = parts[0] if parts else b""
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        if method not in (b"GET", b"HEAD"):
            status, content_type, body = 405, "text/plain", b"method not allowed\n"
        elif path == b"/metrics":
            status, content_type, body = 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        elif path == b"/healthz":
            ok = self.healthy()
            status, content_type = (200 if ok else 503), "text/plain"
            body = b"ok\n" if ok else b"draining\n"
        else:
            status, content_type, body = 404, "text/plain", b"not found\n"
        reason = {
            200: "OK",
            404: "Not Found",
            405: "Method Not Allowed",
            503: "Service Unavailable",
        }
        head = (
            f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        writer.write(head if method == b"HEAD" else head + body)
        await writer.drain()


async def _discard(reader: asyncio.StreamReader) -> None:
    """Read and drop what the client still sends, bounded in bytes and time.

    Closing with unread bytes would reset the client's stream and lose the answer just sent.
    """
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(_LINGER_S):
            dropped = 0
            while dropped < _LINGER_BYTES and (chunk := await reader.read(65536)):
                dropped += len(chunk)
