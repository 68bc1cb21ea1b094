"""One TCP connection's life: the `start_server` handler hands the transport to `EchoConnection`.

Why a Protocol and not the handler's streams: `StreamReader.read()` copies every chunk into and out
of a buffer and wakes a future, and `await drain()` per chunk costs a task switch. Handing the
transport to a small Protocol keeps `asyncio.start_server` as the way connections come in while
the byte path is one callback per chunk: count the bytes, write them back. Backpressure is the
transport's own: when the client stops reading and our write buffer passes its high-water mark,
`pause_writing` pauses reading from that client until the buffer drains.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from typing import Any, Protocol

from echo_async.proxy_protocol import ParseStatus, ProxyHeaderError, ProxyHeaderParser

# A finishing connection is closed once it has been quiet this long (nginx's lingering close)...
LINGER_S = 0.5
# ...and aborted if the client has not let it finish by then (when no shutdown deadline applies).
FINISH_TIMEOUT_S = 5.0

# Close reasons, as they appear in the `reason` field of the close record.
REASON_EOF = "eof"
REASON_RESET = "reset"
REASON_ERROR = "error"
REASON_SHUTDOWN = "shutdown"
REASON_CLOSED = "closed"
REASON_LIMIT = "limit"
REASON_IDLE_TIMEOUT = "idle_timeout"
REASON_MAX_LIFETIME = "max_lifetime"
REASON_MAX_BYTES = "max_bytes"
REASON_PROXY_HEADER = "proxy_header"

# How much one read into the shared buffer may return (both loops read up to 256 KiB themselves).
READ_BUFFER_SIZE = 256 * 1024
# A read at least this big marks a bulk transfer: the connection then reads in place.
BULK_READ = 64 * 1024

_RESET_ERRORS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError)


class ConnectionOwner(Protocol):
    """What a connection reports to: the server that accepted it."""

    def connection_closed(self, connection: EchoConnection) -> None:
        """Account for, and log, a connection whose transport is gone."""

    def proxy_rejected(self, connection: EchoConnection, detail: str) -> None:
        """A connection without a valid PROXY header where one is required."""


class ReadBuffer:
    """The receive buffer shared by one server's connections (one loop, so one at a time).

    The loop reads straight into it (`get_buffer`) and the bytes are written back from it, so a
    chunk is never copied into a `bytes` object on the way. A chunk the transport could not send
    at once stays queued as a view into this buffer; then `renew()` gives the others a new one
    and the old one lives on only as long as that queue.
    """

    __slots__ = ("size", "view")

    def __init__(self, size: int = READ_BUFFER_SIZE) -> None:
        self.size = size
        self.view = memoryview(bytearray(size))

    def renew(self) -> None:
        self.view = memoryview(bytearray(self.size))


class EchoConnection(asyncio.BaseProtocol):
    """The byte path of one client: every chunk received is written straight back.

    `bytes_in` is the only per-chunk bookkeeping. Anything unusual (a `--max-bytes` budget,
    finishing at shutdown or on a limit) lowers `byte_limit`, so the single comparison in
    `data_received` sends the chunk down the slow path. Timers are not per connection: the
    server's sweep reads `bytes_in` and `last_active` once in a while (see `limits.py`).
    """

    __slots__ = (
        "admitted_host",
        "buffered_seen",
        "byte_limit",
        "bytes_in",
        "bytes_in_seen",
        "close_reason",
        "detail",
        "discarded",
        "finish_deadline",
        "kind",
        "last_active",
        "local",
        "lost",
        "max_bytes",
        "opened_at",
        "owner",
        "peer",
        "proxy",
        "proxy_parser",
        "proxy_required",
        "reads",
        "transport",
        "unsent",
        "writer",
        "writing_paused",
    )

    def __init__(
        self,
        owner: ConnectionOwner,
        transport: asyncio.Transport,
        writer: asyncio.StreamWriter | None,
        peer: Any,
        max_bytes: int = 0,
        kind: str = "tcp",
        reads: ReadBuffer | None = None,
    ) -> None:
        self.owner = owner
        self.reads = reads if reads is not None else ReadBuffer()
        self.kind = kind
        self.transport = transport
        # The handler's StreamWriter would close the transport when garbage collected while
        # it is open; release_stream_writer() makes it safe to drop (then None is kept here).
        self.writer = release_stream_writer(writer) if writer is not None else None
        self.lost = False
        self.writing_paused = False
        self.buffered_seen = 0
        # The address the admission limits counted (the PROXY header may change `peer` later).
        self.admitted_host = ""
        self.peer = peer
        self.local: Any = transport.get_extra_info("sockname")
        self.opened_at = self.last_active = time.monotonic()
        self.bytes_in = 0
        self.bytes_in_seen = 0
        self.discarded = 0
        self.unsent = 0
        self.max_bytes = max_bytes
        self.byte_limit: float = self._open_limit()
        self.finish_deadline = math.inf
        self.close_reason: str | None = None
        self.detail: str | None = None
        self.proxy: Any = None
        self.proxy_parser: ProxyHeaderParser | None = None
        self.proxy_required = False

    # -- the byte path -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        size = len(data)
        total = self.bytes_in + size
        self.bytes_in = total
        if total > self.byte_limit:
            self._over_limit(data)
            return
        self.transport.write(data)
        if size >= BULK_READ:
            self._read_in_place()

    def _read_in_place(self) -> None:
        """A bulk transfer: from now on the loop reads into the shared buffer (see below)."""
        if not self.transport.is_closing():
            self.__class__ = BulkEchoConnection
            self.transport.set_protocol(self)

    def expect_proxy_header(self, required: bool) -> None:
        """Read a PROXY protocol header first (the slow path until it is parsed)."""
        self.proxy_parser = ProxyHeaderParser()
        self.proxy_required = required
        self.byte_limit = -1

    def _over_limit(self, data: bytes) -> None:
        if self.proxy_parser is not None:
            self._proxy_data(data)
            return
        if self.finish_deadline != math.inf:
            # Finishing: our side already sent FIN, so what arrives is read and dropped rather
            # than left unread (closing with unread data would reset the client's stream).
            self.discarded += len(data)
            return
        # The --max-bytes budget: echo exactly up to it, then finish.
        allowed = self.max_bytes - (self.bytes_in - len(data))
        if allowed > 0:
            self.echo(data[:allowed])
        self.discarded += len(data) - max(allowed, 0)
        self.finish(REASON_MAX_BYTES, time.monotonic() + FINISH_TIMEOUT_S)

    def _open_limit(self) -> float:
        """`byte_limit` while echoing normally: the --max-bytes budget, or none."""
        return self.max_bytes if self.max_bytes else math.inf

    def echo(self, data: bytes) -> None:
        """Write echoed bytes (off the fast path; fault injection overrides it)."""
        self.transport.write(data)

    def _proxy_data(self, data: bytes) -> None:
        # Header bytes are not payload: they are never echoed nor counted in bytes_in.
        assert self.proxy_parser is not None
        self.bytes_in -= len(data)
        try:
            result = self.proxy_parser.feed(data)
        except ProxyHeaderError as error:
            if self.proxy_required:
                self.owner.proxy_rejected(self, str(error))
                return
            self._end_proxy_parsing(error.data)
            return
        if result.status is ParseStatus.NEED_MORE:
            return
        if result.header is not None:
            if not result.header.local and result.header.source is not None:
                self.proxy = self.peer
                self.peer = result.header.source
        elif self.proxy_required:
            self.owner.proxy_rejected(self, "no PROXY header")
            return
        self._end_proxy_parsing(result.rest)

    def proxy_timed_out(self) -> None:
        """The header did not arrive in time: reject (required) or echo what came (optional)."""
        if self.proxy_parser is None:
            return
        if self.proxy_required:
            self.owner.proxy_rejected(self, "no PROXY header in time")
            return
        self._end_proxy_parsing(self.proxy_parser.abandon())

    def _end_proxy_parsing(self, payload: bytes) -> None:
        self.proxy_parser = None
        if self.finish_deadline == math.inf:
            self.byte_limit = self._open_limit()
        if payload:
            self.data_received(payload)

    def reject(self, reason: str, detail: str) -> None:
        """Close without echoing anything more."""
        self.close_reason = reason
        self.detail = detail
        self.proxy_parser = None
        self.byte_limit = -1
        # Discard whatever still arrives; the sweep aborts it only if it won't close by then.
        self.finish_deadline = time.monotonic() + FINISH_TIMEOUT_S
        self.transport.close()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.proxy_parser is not None:
            if self.proxy_required:
                self.owner.proxy_rejected(self, "EOF before a PROXY header")
                return False
            # Optional mode: what looked like the start of a header is payload after all.
            self._end_proxy_parsing(self.proxy_parser.abandon())
        if self.close_reason is None:
            self.close_reason = REASON_EOF
        # False: the transport closes itself once everything queued has been written.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_reason is None or (exc is not None and self.close_reason == REASON_EOF):
            if exc is None:
                self.close_reason = REASON_CLOSED
            elif isinstance(exc, _RESET_ERRORS):
                self.close_reason = REASON_RESET
            else:
                self.close_reason = REASON_ERROR
        self.writer = None
        self.lost = True
        self.owner.connection_closed(self)

    # -- control from the server ---------------------------------------------------------------

    def finish(self, reason: str, deadline: float) -> None:
        """Stop echoing: flush what is queued, send FIN, close when the client is done.

        Until `deadline` (monotonic seconds) the connection lingers, reading and dropping what
        the client still sends, so the client gets every echoed byte and a clean EOF, never a
        reset. The server's sweep closes it once quiet, or aborts it at the deadline.
        """
        if self.finish_deadline != math.inf or self.transport.is_closing():
            return
        self.close_reason = reason
        self.byte_limit = -1
        self.finish_deadline = deadline
        self.bytes_in_seen = self.bytes_in
        self.last_active = time.monotonic()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def sweep(self, now: float, idle_timeout: float, max_lifetime: float) -> None:
        """Called by the server's sweep: note activity, enforce timers, end lingering finishes."""
        buffered = self.transport.get_write_buffer_size()
        if self.bytes_in != self.bytes_in_seen or buffered != self.buffered_seen:
            # Bytes came in, or our queue to the client moved: a slow reader is not idle.
            self.bytes_in_seen = self.bytes_in
            self.buffered_seen = buffered
            self.last_active = now
        if self.finish_deadline != math.inf:
            if now >= self.finish_deadline:
                self.abort(self.close_reason or REASON_SHUTDOWN)
            elif now - self.last_active >= LINGER_S and not buffered:
                # Flushed, FIN sent, and nothing unread on our side: closing sends no reset.
                self.transport.close()
        elif idle_timeout and now - self.last_active >= idle_timeout:
            if buffered:
                self.abort(REASON_IDLE_TIMEOUT)  # it stopped reading too: nothing to wait for
            else:
                self.finish(REASON_IDLE_TIMEOUT, now + FINISH_TIMEOUT_S)
        elif max_lifetime and now - self.opened_at >= max_lifetime:
            self.finish(REASON_MAX_LIFETIME, now + FINISH_TIMEOUT_S)

    def abort(self, reason: str) -> None:
        """Drop the connection now (TCP RST); bytes still queued are counted as unsent."""
        if self.lost:
            return
        self.close_reason = reason
        # A second abort before connection_lost sees an emptied buffer: keep the first count.
        self.unsent = max(self.unsent, self.transport.get_write_buffer_size())
        self.transport.abort()

    # -- accounting ----------------------------------------------------------------------------

    @property
    def bytes_out(self) -> int:
        """Bytes echoed back: handed to the kernel, or queued for it while the connection is open.

        On a reset by the client, bytes still queued in the process at that moment are included
        (the loop discards its buffer before telling us), so this is an upper bound then.
        """
        return self.bytes_in - self.discarded - self.unsent

    def record(self) -> dict[str, Any]:
        """The fields of this connection's close record (never the payload)."""
        record = {
            "peer": format_address(self.peer),
            "local": format_address(self.local),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_s": round(time.monotonic() - self.opened_at, 6),
            "reason": self.close_reason,
        }
        if self.proxy is not None:
            record["proxy"] = format_address(self.proxy)
        if self.detail is not None:
            record["detail"] = self.detail
        return record


class BulkEchoConnection(EchoConnection, asyncio.BufferedProtocol):
    """An EchoConnection that has seen a bulk read, and now reads into the server's ReadBuffer.

    For small chunks the loop's own `bytes` object is the cheapest carrier: one call per chunk.
    For big ones, copying every read into a new `bytes` object costs more than the second call
    (`get_buffer`) of a BufferedProtocol, so `data_received` switches a connection over (same
    object, same state, same slots) on its first read of `BULK_READ` bytes or more. Everything
    but the byte path is EchoConnection's.
    """

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reads.view

    def buffer_updated(self, nbytes: int) -> None:
        total = self.bytes_in + nbytes
        self.bytes_in = total
        reads = self.reads
        if total > self.byte_limit:
            self._over_limit(bytes(reads.view[:nbytes]))
            return
        transport = self.transport
        if transport.get_write_buffer_size():
            # Queued behind earlier bytes anyway: a copy keeps the shared buffer free.
            transport.write(bytes(reads.view[:nbytes]))
            return
        transport.write(reads.view[:nbytes])
        if transport.get_write_buffer_size():
            # Not all sent: the transport keeps a view into the buffer until it is.
            reads.renew()


class _Detached:
    """Stands in for the transport of a StreamWriter the server no longer uses."""

    __slots__ = ()

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        pass


_DETACHED = _Detached()


def release_stream_writer(writer: asyncio.StreamWriter) -> asyncio.StreamWriter | None:
    """Let the handler's StreamWriter (and its StreamReader and protocol) be garbage collected.

    Once the transport is handed to EchoConnection the streams are unused, but StreamWriter's
    `__del__` closes a still-open transport, so they would have to be kept alive: about 1.7 KiB
    per idle connection, half of it. Pointing the writer at a closed stand-in makes dropping it
    safe. This touches StreamWriter's private `_transport`; where that attribute is not what we
    expect, the writer is returned so the caller keeps it, which is always correct.
    """
    if getattr(writer, "_transport", None) is not writer.transport:
        return writer
    try:
        writer._transport = _DETACHED  # type: ignore[attr-defined]
    except AttributeError:
        return writer
    return None


def format_address(address: Any) -> str:
    """`host:port` for IPv4, `[host]:port` for IPv6, the path for Unix sockets.

    IPv6 hosts are written in canonical (compressed) form, and IPv4-mapped ones (`::ffff:a.b.c.d`,
    how a dual-stack `[::]` listener sees IPv4 clients) as the IPv4 address they are.
    """
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        if ":" in host:
            try:
                ip = ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                return f"[{host}]:{port}"
            if ip.ipv4_mapped is not None:
                return f"{ip.ipv4_mapped}:{port}"
            scope = "%" + host.split("%", 1)[1] if "%" in host else ""
            return f"[{ip.compressed}{scope}]:{port}"
        return f"{host}:{port}"
    if isinstance(address, str | bytes) and address:
        return address if isinstance(address, str) else address.decode("utf-8", "replace")
    return "unknown"
