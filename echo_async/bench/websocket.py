"""``--url ws://`` and ``wss://``: the bench's traffic shapes over WebSocket, one message per echo.

The opening handshake, framing, masking, pings and the closing handshake are the websockets
library's Sans-I/O :class:`~websockets.client.ClientProtocol`; these clients feed it the bytes
of an asyncio Protocol (no task per connection or message, as for TCP) and check the messages it
returns. Every message is binary, cut from the same pattern a TCP client would send at that
stream position, and must come back as one binary message with the same bytes, in order: a
text message, a short, long, corrupted or reordered one counts its bytes as mismatched.

A close frame from the server during the run is an error; at the end the bench sends close code
1000 and a server that answers with another code than 1000 or 1001 (an empty close frame is
fine), or with no close frame within :data:`CLOSE_TIMEOUT_S`, is counted as an error too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.parse
from collections import deque
from time import perf_counter_ns
from typing import TYPE_CHECKING, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import BINARY, CLOSE, CONT, TEXT, Close, CloseCode, Frame
from websockets.protocol import OPEN
from websockets.typing import BytesLike
from websockets.uri import WebSocketURI, parse_uri

from echo_async.bench import pattern
from echo_async.bench.clients import Client
from echo_async.bench.counters import Counters

if TYPE_CHECKING:
    from websockets.protocol import Event

    from echo_async.bench.config import BenchConfig

CLOSE_TIMEOUT_S = 1.5
"""How long a closing connection waits for the server's close frame; below the driver's
CLOSE_WAIT_S, so an error counted when it runs out still reaches the result."""

CLEAN_CLOSE_CODES = frozenset({CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY})
# An empty close frame (read as 1005) is also a lawful answer to ours (RFC 6455, 5.5.1).
CLEAN_ANSWER_CODES = CLEAN_CLOSE_CODES | {CloseCode.NO_STATUS_RCVD}
DETAIL_LIMIT = 80  # characters of a server's text (close reason, bad response) kept in an error


def parse_url(url: str) -> WebSocketURI:
    """``url`` parsed; BenchConfigError (naming --url) when it is not a usable ws:// or wss://."""
    from echo_async.bench.config import BenchConfigError  # config imports this module

    try:
        uri = parse_uri(url)
        explicit_port = urllib.parse.urlsplit(url).port  # parse_uri reads port 0 as "default"
    except InvalidURI as exc:
        raise BenchConfigError(f"--url {url}: {exc.msg} (try ws://HOST:PORT/PATH)") from None
    except ValueError as exc:  # urllib's: a port that is not a number, or out of range
        raise BenchConfigError(f"--url {url}: {exc}") from None
    if explicit_port == 0:
        raise BenchConfigError(f"--url {url}: the port must be between 1 and 65535")
    return uri


def adopt_url(config: BenchConfig) -> None:
    """Check the options given beside ``config.url``, then take host, port and TLS from it.

    For ``BenchConfig.__post_init__`` only (the config is frozen, hence ``object.__setattr__``):
    ``wss://`` is ``--tls``, so ``--tls-ca`` applies to it as to TCP. ``--host`` and ``--port``
    may only repeat what the URL says (a config passed on to a worker process does).
    """
    from echo_async.bench.config import BenchConfigError

    assert config.url is not None
    uri = parse_url(config.url)
    default_host = next(
        field.default for field in dataclasses.fields(config) if field.name == "host"
    )
    for flag, given, allowed in (
        ("--host", config.host, (default_host, uri.host)),
        ("--port", config.port, (None, uri.port)),
        ("--unix", config.unix_path, (None,)),
        ("--udp", config.udp, (False,)),
        ("--greeting", config.greeting, (False,)),
    ):
        if given not in allowed:
            raise BenchConfigError(f"--url names the server and its transport: drop {flag}")
    if config.tls and not uri.secure:
        raise BenchConfigError("--tls needs a wss:// URL (ws:// is plaintext)")
    if config.tls_ca is not None and not uri.secure:
        raise BenchConfigError("--tls-ca needs a wss:// URL")
    object.__setattr__(config, "host", uri.host)
    object.__setattr__(config, "port", uri.port)
    object.__setattr__(config, "tls", uri.secure)


def _shorten(text: str) -> str:
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


def _close_text(code: int, reason: str) -> str:
    try:
        name = CloseCode(code).name.lower().replace("_", " ")
    except ValueError:
        name = "application code"
    return f"{code} {name}" + (f": {_shorten(reason)!r}" if reason else "")


class WebSocketClient(Client):
    """What both WebSocket clients share: the opening handshake, frames in and out, the close.

    A subclass sends in :meth:`opened` (the handshake is done) and checks each whole message in
    :meth:`message`; both may queue frames, which :meth:`data_received` then writes at once.
    ``started_at`` (perf_counter_ns) times the handshake against --timeout.
    """

    __slots__ = (
        "awaiting_close",
        "close_timer",
        "fragments",
        "is_open",
        "messages_received",
        "protocol",
        "started_at",
    )

    def __init__(
        self, counters: Counters, index: int, size: int, uri: WebSocketURI, started_at: int
    ) -> None:
        super().__init__(counters, index, size)
        # Room for a longer echo than was sent (text re-encoded as UTF-8, say): it is then a
        # mismatch, with its reason, rather than close code 1009 from our own protocol object.
        self.protocol = ClientProtocol(uri, max_size=2 * size + 4096)
        self.started_at = started_at
        self.is_open = False
        self.messages_received = 0
        self.fragments: list[Frame] = []  # a message the server sent in several frames
        self.awaiting_close = False  # our close frame is out; the server's has not come
        self.close_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        protocol = self.protocol
        protocol.send_request(protocol.connect())
        self._flush()

    def opened(self) -> None:
        """The handshake is done: begin sending."""

    def message(self, data: BytesLike, binary: bool) -> None:
        """Check one whole message the server sent (``binary``: not text)."""

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        if not self.is_open:
            self._handshake(events)
        else:
            message = self.message
            for frame in cast("list[Frame]", events):
                if frame.opcode is BINARY and frame.fin:
                    message(frame.data, True)
                else:
                    self._other_frame(frame)
        self._flush()
        if protocol.state is not OPEN:
            self._not_open()

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self._flush()
        if self.is_open:
            self._not_open()
        else:
            self._handshake([])  # the server hung up before (all of) its response

    def _flush(self) -> None:
        """Write what the protocol queued (frames, pongs, close replies)."""
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            else:  # the protocol's end of stream: done with the connection
                self.transport.close()

    def _handshake(self, events: list[Event]) -> None:
        protocol = self.protocol
        failure = protocol.handshake_exc
        if failure is not None:
            cause = failure.__cause__
            detail = f"{failure}: {cause}" if cause is not None else str(failure)
            self._fail(f"WebSocket handshake: {_shorten(detail)}")
            return
        if protocol.state is not OPEN:
            return  # more of the response to come
        self.is_open = True
        # Frames in the same read as the response came before we sent anything.
        for event in events[1:]:
            self._other_frame(cast(Frame, event))
        self.opened()

    def _other_frame(self, frame: Frame) -> None:
        """Everything but a whole binary message: fragments, text, control frames."""
        if frame.opcode is CLOSE:
            self._close_frame(Close.parse(frame.data))
            return
        if frame.opcode not in (TEXT, BINARY, CONT):
            return  # ping (the protocol queued the pong) or pong
        fragments = self.fragments
        fragments.append(frame)
        if frame.fin:
            self.fragments = []
            data = b"".join(fragment.data for fragment in fragments)
            self.message(data, fragments[0].opcode is BINARY)

    def _close_frame(self, received: Close) -> None:
        text = _close_text(received.code, received.reason)
        if self.awaiting_close:
            self.awaiting_close = False
            if received.code not in CLEAN_ANSWER_CODES:
                self.counters.error(f"WebSocket: the server answered our close with {text}")
        elif not self.closing:
            self.closing = True  # counted here, not again when the connection goes
            if received.code not in CLEAN_CLOSE_CODES or not self.counters.stopping:
                self.counters.error(f"WebSocket: the server closed the connection ({text})")

    def _not_open(self) -> None:
        """The protocol left OPEN: a close frame (handled already) or a protocol failure."""
        if self.closing or not self.is_open:
            return
        # Why the protocol failed the connection: the attribute is not documented (close_exc,
        # which is, waits for the server's TCP close); tests name the reasons it gives.
        failure = getattr(self.protocol, "parser_exc", None)
        if isinstance(failure, EOFError):
            kind = "the server closed the connection without a close frame"
        elif failure is not None:
            kind = _shorten(str(failure) or type(failure).__name__)
        else:
            kind = "the connection failed"
        self._fail(f"WebSocket: {kind}")

    def _fail(self, kind: str) -> None:
        """Count one error and drop the connection (the server broke the protocol)."""
        if not self.closing:
            self.closing = True
            self.awaiting_close = False
            if not self.counters.stopping or self.is_open:
                self.counters.error(kind)
        self.transport.close()

    def close(self) -> None:
        """Start the closing handshake with code 1000; the server's answer is still checked."""
        if self.closing:
            return
        self.closing = True
        if self.protocol.state is not OPEN:
            self.transport.close()
            return
        self.protocol.send_close(CloseCode.NORMAL_CLOSURE)
        self._flush()
        self.awaiting_close = True
        loop = asyncio.get_running_loop()
        self.close_timer = loop.call_later(CLOSE_TIMEOUT_S, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self.close_timer = None
        if self.awaiting_close:
            self.awaiting_close = False
            self.counters.error(f"WebSocket: no close frame within {CLOSE_TIMEOUT_S:g}s")
        # The server's close frame came but not its TCP close, which is its to do: no error.
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        if self.awaiting_close:
            self.awaiting_close = False
            self.counters.error("WebSocket: the connection ended before the server's close frame")
        super().connection_lost(exc)

    def tick(self, now: int, timeout_ns: int) -> None:
        if not self.is_open and not self.closing and now - self.started_at > timeout_ns:
            self.counters.error(f"WebSocket handshake: no response within {timeout_ns / 1e9:g}s")
            self.closing = True
            self.transport.abort()
            return
        super().tick(now, timeout_ns)

    def _check(self, data: BytesLike, binary: bool, expected: bytes) -> None:
        """Count the bytes of message ``data`` that differ from ``expected``, off the hot path."""
        number = self.messages_received
        where = f"connection {self.index}, message {number}"
        if not binary:
            self.counters.mismatch(
                max(len(data), len(expected)),
                f"{where}: sent binary, echoed as a text message",
            )
            return
        count, first = pattern.differences(bytes(data), expected)
        if len(data) != len(expected):
            description = f"{where}: sent {len(expected)} bytes, echoed {len(data)}"
        else:
            description = (
                f"{where}, byte {first}: sent 0x{expected[first]:02x}, echoed 0x{data[first]:02x}"
            )
        self.counters.mismatch(count, description)

    def _unexpected_message(self, data: BytesLike) -> None:
        self.counters.mismatch(
            max(1, len(data)),
            f"connection {self.index}: a {len(data)}-byte message echoed that was never sent "
            f"(after message {self.messages_received})",
        )


class WebSocketPipelineClient(WebSocketClient):
    """pingpong, --pipeline, --rate and stream over WebSocket: keep ``depth`` messages in flight,
    or pace them at ``interval_ns`` and time them from when they were due.

    Each message is timed on its own, from its send (or due time) to its echo.
    """

    __slots__ = ("depth", "due", "in_flight", "interval_ns", "phase_ns", "position", "timer")

    def __init__(
        self,
        counters: Counters,
        index: int,
        size: int,
        depth: int,
        interval_ns: int,
        phase_ns: int,
        uri: WebSocketURI,
    ) -> None:
        super().__init__(counters, index, size, uri, perf_counter_ns())
        self.depth = depth
        self.interval_ns = interval_ns
        self.phase_ns = phase_ns
        self.position = 0  # stream position of the next message, as a TCP client's bytes
        self.in_flight: deque[tuple[bytes, int]] = deque()  # (message, sent or due at)
        self.due = 0
        self.timer: asyncio.TimerHandle | None = None

    def opened(self) -> None:
        now = perf_counter_ns()
        self.due = now + self.phase_ns
        self._send(now)

    def _send(self, now: int) -> None:
        if self.protocol.state is not OPEN:
            return  # closing: the server's close frame came in the same read as this echo
        counters = self.counters
        if self.interval_ns == 0:
            count = min(self.depth - len(self.in_flight), counters.budget)
            if count > 0:
                counters.budget -= count
                for _ in range(count):
                    self._write(now)
            return
        while len(self.in_flight) < self.depth and counters.budget > 0 and self.due <= now:
            counters.budget -= 1
            self._write(self.due)  # timed from when it was due: no coordinated omission
            self.due += self.interval_ns
        if self.timer is None and counters.budget > 0 and len(self.in_flight) < self.depth:
            delay = max(0, self.due - now) / 1e9
            self.timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _write(self, sent_at: int) -> None:
        message = pattern.window(self.origin + self.position, self.size)
        self.position += self.size
        self.in_flight.append((message, sent_at))
        self.protocol.send_binary(message)

    def _on_timer(self) -> None:
        self.timer = None
        if not self.closing and not self.transport.is_closing():
            self._send(perf_counter_ns())
            self._flush()

    def message(self, data: BytesLike, binary: bool) -> None:
        in_flight = self.in_flight
        if not in_flight:
            self._unexpected_message(data)
            return
        expected, sent_at = in_flight.popleft()
        if data != expected or not binary:
            self._check(data, binary, expected)
        self.messages_received += 1
        counters = self.counters
        if self.closing:
            return  # the run is over: checked, but not measured
        now = perf_counter_ns()
        counters.latency.record(now - sent_at)
        counters.round_trips += 1
        counters.echoed_bytes += len(data)
        if counters.round_trips >= counters.target:
            counters.finished.set()
        self._send(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().connection_lost(exc)

    def waiting_since(self) -> int | None:
        return self.in_flight[0][1] if self.in_flight else None

    def unanswered(self) -> int:
        return len(self.in_flight)


class WebSocketSingleEchoClient(WebSocketClient):
    """oneshot and hold over WebSocket: one message once the handshake is done, then close
    (``hang_up``) or stay idle. Latency runs from ``started_at``: when the connect began (or
    was due), so it includes the TCP, TLS and WebSocket handshakes.
    """

    __slots__ = ("echoed", "hang_up", "payload")

    def __init__(
        self,
        counters: Counters,
        index: int,
        size: int,
        started_at: int,
        *,
        hang_up: bool,
        uri: WebSocketURI,
    ) -> None:
        super().__init__(counters, index, size, uri, started_at)
        self.hang_up = hang_up
        self.payload = pattern.window(self.origin, size)
        self.echoed = False

    def opened(self) -> None:
        self.protocol.send_binary(self.payload)

    def message(self, data: BytesLike, binary: bool) -> None:
        if self.echoed:
            self._unexpected_message(data)
            return
        if data != self.payload or not binary:
            self._check(data, binary, self.payload)
        self.echoed = True
        self.messages_received += 1
        counters = self.counters
        counters.echoed_bytes += len(data)
        counters.latency.record(perf_counter_ns() - self.started_at)
        counters.round_trips += 1
        if counters.round_trips >= counters.target:
            counters.finished.set()
        if self.hang_up:
            self.close()

    def waiting_since(self) -> int | None:
        return None if self.echoed else self.started_at

    def unanswered(self) -> int:
        return 0 if self.echoed else 1
