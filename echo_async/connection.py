"""One stream connection's life, as explicit states, and its byte path.

The `start_server` handler (see `state.py`) hands the transport to `EchoConnection`. Why a
Protocol and not the handler's streams: `StreamReader.read()` copies every chunk into and out of
a buffer and wakes a future, and `await drain()` per chunk costs a task switch. Handing the
transport to a small Protocol keeps `asyncio.start_server` as the way connections come in while
the byte path is one callback per chunk: count the bytes, write them back. Backpressure is the
transport's own: when the client stops reading and our write buffer passes its high-water mark,
`pause_writing` pauses reading from that client until the buffer drains.

A connection moves through `State`s, forwards only:

    HEADER (PROXY header) -> HANDSHAKE (tls://) -> OPEN -> FINISHING -> LINGERING -> CLOSED

FINISHING echoes what the server's kernel had already received when the finish began (SIOCINQ),
then sends EOF; LINGERING reads and drops what still arrives until the client closes, so the
client gets every echoed byte and a clean EOF rather than a reset. A rejected connection goes
straight to LINGERING without echoing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import ipaddress
import math
import struct
import termios
import time
from typing import TYPE_CHECKING, Any, Protocol

from echo_async.proxy_protocol import ParseStatus, ProxyHeaderError, ProxyHeaderParser
from echo_async.tls import session_fields

if TYPE_CHECKING:
    from echo_async.websocket import WebSocketSession

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
REASON_TLS_HANDSHAKE = "tls_handshake"

# How much one read into the shared buffer may return (both loops read up to 256 KiB themselves).
READ_BUFFER_SIZE = 256 * 1024
# A read at least this big marks a bulk transfer: the connection then reads in place.
BULK_READ = 64 * 1024

# The most plaintext one TLS record carries (RFC 8446 section 5.1).
TLS_RECORD_MAX = 16 * 1024

_RESET_ERRORS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError)


class State(enum.Enum):
    """Where a connection is in its life; see the module's docstring."""

    HEADER = "header"
    HANDSHAKE = "handshake"
    OPEN = "open"
    FINISHING = "finishing"
    LINGERING = "lingering"
    CLOSED = "closed"


class ConnectionOwner(Protocol):
    """What a connection reports to: the server state that accepted it."""

    def connection_opened(self, connection: EchoConnection) -> None:
        """The connection starts echoing (after its PROXY header and TLS handshake)."""

    def connection_closed(self, connection: EchoConnection) -> None:
        """Account for, and log, a connection whose transport is gone."""

    def connection_rejected(self, connection: EchoConnection, reason: str, detail: str) -> None:
        """Count a connection refused after admission (a bad PROXY header); it then lingers."""

    def header_ended(self, connection: EchoConnection, payload: bytes) -> None:
        """The PROXY header stage is over; `payload` is what followed it."""

    def handshake_done(self, connection: EchoConnection, transport: asyncio.Transport) -> None:
        """The TLS handshake succeeded: `transport` is the TLS transport; start echoing."""


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

    `bytes_in` is the only per-chunk bookkeeping. Every state but OPEN without a budget lowers
    `byte_limit`, so the single comparison in `data_received` sends the chunk down the slow path
    (`_over_limit`), which acts on `state`. Timers are not per connection: the server's sweep
    reads `bytes_in` and `last_active` once in a while (see `limits.py`).
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
        "early",
        "echo_limit",
        "finish_deadline",
        "kind",
        "last_active",
        "local",
        "lost",
        "opened_at",
        "owner",
        "peer",
        "proxy",
        "proxy_parser",
        "proxy_required",
        "reads",
        "state",
        "transport",
        "unsent",
        "websocket",
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
        self.state = State.OPEN
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
        # The most bytes_in that will be echoed: the --max-bytes budget, or a finish's.
        self.echo_limit: float = max_bytes if max_bytes else math.inf
        self.byte_limit: float = self.echo_limit - 1
        self.finish_deadline = math.inf
        self.close_reason: str | None = None
        self.detail: str | None = None
        self.proxy: Any = None
        self.proxy_parser: ProxyHeaderParser | None = None
        self.proxy_required = False
        # During a TLS handshake: first the bytes read as plain TCP that belong to the TLS layer
        # (a bytearray, see tls.upgrade), then the application chunks that arrive before open()
        # can run (a list, echoed by open()). None otherwise.
        self.early: bytearray | list[bytes] | None = None
        # ws:// and wss://: the WebSocket protocol between the wire and the echo (websocket.py).
        self.websocket: WebSocketSession | None = None

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

    def _over_limit(self, data: bytes) -> None:
        state = self.state
        if state is State.HEADER:
            self._proxy_data(data)
            return
        size = len(data)
        websocket = self.websocket
        if websocket is not None and state is not State.HANDSHAKE:
            # bytes_in counts message payload, which the session adds; wire bytes are its own.
            self.bytes_in -= size
            if state is State.OPEN or state is State.FINISHING:
                websocket.received(data)
            return
        if state is State.HANDSHAKE:
            self.bytes_in -= size
            early = self.early
            if isinstance(early, bytearray):
                early += data  # read before the TLS layer took the socket over: its own
            elif self._handshake_is_done():
                self.data_received(data)
            elif early is not None:
                early.append(data)  # decrypted before the server could see the handshake end
            return
        if state is State.OPEN or state is State.FINISHING:
            # The echo budget (--max-bytes, or what a finish owes) ends in this chunk.
            allowed = max(int(self.echo_limit) - (self.bytes_in - size), 0)
            if allowed:
                self.echo(data[:allowed] if allowed < size else data)
            self.discarded += size - allowed
            if self.bytes_in - size + allowed >= self.echo_limit:
                if state is State.OPEN:
                    self.close_reason = REASON_MAX_BYTES
                self.send_eof()
            return
        # Lingering: our side already sent FIN, so what arrives is read and dropped rather
        # than left unread (closing with unread data would reset the client's stream).
        self.discarded += size

    def echo(self, data: bytes) -> None:
        """Write echoed bytes (off the fast path; fault injection overrides it)."""
        self.transport.write(data)

    def send_greeting(self, greeting: bytes) -> None:
        """Send the --greeting line before any echo (a text message on ws://)."""
        if self.websocket is not None:
            self.websocket.greet(greeting)
        else:
            self.transport.write(greeting)

    # -- states --------------------------------------------------------------------------------

    def expect_proxy_header(self, required: bool) -> None:
        """Read a PROXY protocol header first (the slow path until it is parsed)."""
        self.proxy_parser = ProxyHeaderParser()
        self.proxy_required = required
        self.state = State.HEADER
        self.byte_limit = -1

    def _handshake_is_done(self) -> bool:
        """Application data or EOF came through TLS: the handshake is over, open now if we can."""
        if self.state is State.HANDSHAKE and self.transport.get_extra_info("ssl_object"):
            self.owner.handshake_done(self, self.transport)
        return self.state is not State.HANDSHAKE

    def open(self) -> None:
        """Start echoing: the PROXY header and TLS handshake, if any, are behind us.

        On ws:// the connection counts as opened once its WebSocket handshake succeeds, and
        every chunk takes the slow path, to the WebSocket session.
        """
        self.state = State.OPEN
        if self.websocket is None:
            self.byte_limit = self.echo_limit - 1
            self.owner.connection_opened(self)
        else:
            self.byte_limit = -1
        held = self.early
        self.early = None
        if isinstance(held, list):
            for chunk in held:
                self.data_received(chunk)

    def take_early(self, tls_transport: asyncio.Transport | None) -> bytes:
        """The TLS layer's bytes read so far; from now on, bytes received are application data.

        `tls_transport` is where those go once the handshake is done (see tls.upgrade).
        """
        early = self.early
        if not isinstance(early, bytearray):
            return b""
        self.early = []
        if tls_transport is not None:
            self.transport = tls_transport
        return bytes(early)

    def _proxy_data(self, data: bytes) -> None:
        # Header bytes are not payload: they are never echoed nor counted in bytes_in.
        assert self.proxy_parser is not None
        self.bytes_in -= len(data)
        try:
            result = self.proxy_parser.feed(data)
        except ProxyHeaderError as error:
            if self.proxy_required:
                self.reject(REASON_PROXY_HEADER, str(error))
                return
            self._end_header(error.data)
            return
        if result.status is ParseStatus.NEED_MORE:
            return
        if result.header is not None:
            if not result.header.local and result.header.source is not None:
                self.proxy = self.peer
                self.peer = result.header.source
        elif self.proxy_required:
            self.reject(REASON_PROXY_HEADER, "no PROXY header")
            return
        self._end_header(result.rest)

    def proxy_timed_out(self) -> None:
        """The header did not arrive in time: reject (required) or echo what came (optional)."""
        if self.proxy_parser is None:
            return
        if self.proxy_required:
            self.reject(REASON_PROXY_HEADER, "no PROXY header in time")
            return
        self._end_header(self.proxy_parser.abandon())

    def _end_header(self, payload: bytes) -> None:
        self.proxy_parser = None
        self.owner.header_ended(self, payload)

    def reject(self, reason: str, detail: str) -> None:
        """Refuse the connection: echo nothing, send EOF, drop what still arrives, then close."""
        if self.state is State.LINGERING or self.state is State.CLOSED:
            return
        self.proxy_parser = None
        self.close_reason = reason
        self.detail = detail
        self.echo_limit = self.bytes_in
        self.send_eof()
        self.owner.connection_rejected(self, reason, detail)

    def finish(self, reason: str, deadline: float) -> None:
        """Stop echoing gracefully: what the server already received comes back, then EOF.

        "Already received" is what this connection has read plus what the kernel (and a TLS
        layer) holds unread right now; later bytes are read and dropped. Until `deadline`
        (monotonic seconds) the connection lingers so the client gets every echoed byte and a
        clean EOF, never a reset. The server's sweep aborts it at the deadline.
        """
        if self.state is State.HEADER:
            self.proxy_timed_out()  # decide now: reject, or the bytes so far are payload
        state = self.state
        if state is State.HANDSHAKE:
            # Nothing has been echoed yet: end the handshake (the handshake task accounts).
            self.close_reason = reason
            self.transport.close()
            return
        if state is State.OPEN:
            self.finish_deadline = deadline
            self.last_active = time.monotonic()
            self.bytes_in_seen = self.bytes_in
            if self.transport.is_closing():
                # The client sent EOF: the transport closes once our queue is flushed.
                self.state = State.LINGERING
                self.byte_limit = -1
                return
            self.close_reason = reason
            self.state = State.FINISHING
            websocket = self.websocket
            if websocket is not None:
                # The budget is in wire bytes: the frames those carry are echoed, then close.
                unread = received_unread(self.transport)
                websocket.finish(unread)
                if not unread:
                    self.send_eof()
                return
            self.echo_limit = min(self.echo_limit, self.bytes_in + received_unread(self.transport))
            self.byte_limit = self.echo_limit - 1
            if self.bytes_in >= self.echo_limit:
                self.send_eof()
            return
        if state is State.FINISHING or state is State.LINGERING:
            self.finish_deadline = min(self.finish_deadline, deadline)

    def send_eof(self) -> None:
        """FIN after everything queued; from now on arriving bytes are read and dropped.

        On ws:// the WebSocket close handshake comes first: our close frame goes out now and
        the FIN once the client answers it (or at the finish deadline).
        """
        now = time.monotonic()
        if self.finish_deadline == math.inf:
            # Whatever ends our side, the client gets FINISH_TIMEOUT_S to let the connection
            # finish, then the sweep aborts it; an earlier deadline (a shutdown's) stands.
            self.finish_deadline = now + FINISH_TIMEOUT_S
        websocket = self.websocket
        if websocket is not None and websocket.close_first(self.close_reason):
            if self.state is State.OPEN:
                self.state = State.FINISHING
            return
        self.state = State.LINGERING
        self.byte_limit = -1
        self.last_active = now
        self.bytes_in_seen = self.bytes_in
        transport = self.transport
        if transport.is_closing():
            return
        if self.writing_paused:
            transport.resume_reading()  # nothing more is echoed: keep draining the client
        self.write_eof()

    def write_eof(self) -> None:
        """Half-close our side after what is queued (fault injection may hold it back)."""
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()  # TLS: close_notify once flushed, then reads are dropped

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.state is not State.LINGERING and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.state is State.HANDSHAKE:
            self._handshake_is_done()
        if self.state is State.HEADER:
            if self.proxy_required:
                self.reject(REASON_PROXY_HEADER, "EOF before a PROXY header")
                return False
            # Optional mode: what looked like the start of a header is payload after all.
            assert self.proxy_parser is not None
            self._end_header(self.proxy_parser.abandon())
        if self.close_reason is None:
            self.close_reason = REASON_EOF
        # False: the transport closes itself once everything queued has been written.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self.lost = True
        if state is State.CLOSED or state is State.HANDSHAKE:
            return  # a handshake that did not complete is accounted by the handshake task
        if self.close_reason is None or (exc is not None and self.close_reason == REASON_EOF):
            if exc is None:
                self.close_reason = REASON_CLOSED
            elif isinstance(exc, _RESET_ERRORS):
                self.close_reason = REASON_RESET
            else:
                self.close_reason = REASON_ERROR
        self.state = State.CLOSED
        self.writer = None
        self.owner.connection_closed(self)

    # -- control from the server's sweep -------------------------------------------------------

    def sweep(self, now: float, idle_timeout: float, max_lifetime: float) -> None:
        """Note activity, enforce timers, end lingering finishes (called by the server's sweep)."""
        buffered = self.transport.get_write_buffer_size()
        if self.bytes_in != self.bytes_in_seen or buffered != self.buffered_seen:
            # Bytes came in, or our queue to the client moved: a slow reader is not idle.
            self.bytes_in_seen = self.bytes_in
            self.buffered_seen = buffered
            self.last_active = now
        state = self.state
        if state is State.OPEN:
            if idle_timeout and now - self.last_active >= idle_timeout:
                if buffered:
                    self.abort(REASON_IDLE_TIMEOUT)  # it stopped reading too: nothing to wait for
                else:
                    self.finish(REASON_IDLE_TIMEOUT, now + FINISH_TIMEOUT_S)
            elif max_lifetime and now - self.opened_at >= max_lifetime:
                self.finish(REASON_MAX_LIFETIME, now + FINISH_TIMEOUT_S)
        elif state is State.FINISHING or state is State.LINGERING:
            if now >= self.finish_deadline:
                self.abort(self.close_reason or REASON_SHUTDOWN)
            elif (
                state is State.FINISHING
                and not self.writing_paused
                and not received_unread(self.transport, tls_margin=False)
            ):
                # Reading, and nothing received is left unread: what the budget still allows
                # could only come from bytes sent after the finish began (see TLS_RECORD_MAX).
                self.send_eof()
            elif state is State.LINGERING and now - self.last_active >= LINGER_S and not buffered:
                # Flushed, FIN sent, and nothing unread on our side: closing sends no reset.
                self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection now (TCP RST); bytes still queued are counted as unsent."""
        if self.lost:
            return
        self.close_reason = reason
        # A second abort before connection_lost sees an emptied buffer: keep the first count.
        # The queue may hold more than echoed payload (a greeting; on ws:// frame headers,
        # pongs, our close): count at most what was echoed, so bytes_out never goes below 0.
        queued = min(self.transport.get_write_buffer_size(), self.bytes_in - self.discarded)
        self.unsent = max(self.unsent, queued)
        self.transport.abort()

    # -- accounting ----------------------------------------------------------------------------

    @property
    def bytes_out(self) -> int:
        """Bytes echoed back: handed to the kernel, or queued for it while the connection is open.

        On a reset by the client, bytes still queued in the process at that moment are included
        (the loop discards its buffer before telling us), so this is an upper bound then.
        """
        return self.bytes_in - self.discarded - self.unsent

    def record(self, ended_at: float | None = None) -> dict[str, Any]:
        """The fields of this connection's close record (never the payload).

        `ended_at` is when it closed (monotonic seconds); by default, now.
        """
        if ended_at is None:
            ended_at = time.monotonic()
        record = {
            "transport": self.kind,
            "peer": format_address(self.peer),
            "local": format_address(self.local),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_s": round(ended_at - self.opened_at, 6),
            "reason": self.close_reason,
        }
        if self.proxy is not None:
            record["proxy"] = format_address(self.proxy)
        if self.detail is not None:
            record["detail"] = self.detail
        if self.websocket is not None:
            record.update(self.websocket.fields())
        if self.kind == "tls" or self.kind == "wss":
            # What was negotiated: the TLS object outlives the connection in its transport.
            record.update(session_fields(self.transport))
        return record


def received_unread(transport: Any, tls_margin: bool = True) -> int:
    """Bytes from the client not yet delivered to the protocol: in the kernel, or a TLS layer.

    The kernel's count is exact (SIOCINQ). A TLS layer holds ciphertext, a little more than the
    plaintext it carries, and OpenSSL may hold one record it has taken from its input but not
    yet decrypted, which nothing reports: for tls:// the count adds what the TLS layer reports
    and one whole record, erring on the side of echoing a few KiB too many, never one too few.
    """
    unread = 0
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            pass
        else:
            unread = int(struct.unpack("i", raw)[0])
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        if tls_margin:
            unread += TLS_RECORD_MAX
        with contextlib.suppress(Exception):
            unread += ssl_object.pending()
        read_buffer_size = getattr(transport, "get_read_buffer_size", None)
        if read_buffer_size is not None:
            with contextlib.suppress(Exception):
                unread += int(read_buffer_size())
    return unread


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
