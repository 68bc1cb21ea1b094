"""WebSocket echo (ws://, wss://) on the websockets library's Sans-I/O protocol.

A ws:// connection is an `EchoConnection` like any other: admission, the PROXY header, the TLS
handshake for wss://, the timers, the drain and the close record are the stream path's. Only
its bytes take another way: once open, every chunk goes to the connection's `WebSocketSession`
instead of straight back. websockets' `ServerProtocol` parses the opening handshake and the
frames, answers pings and the close handshake, enforces the message size (close code 1009) and
frames what we send; nothing here reads or writes WebSocket framing itself.

Each data frame is echoed as it arrives, as a frame with the same opcode and FIN bit, so a
message comes back as one message of the same type (text stays text, binary stays binary), in
order, and is never held whole in memory. Text is checked to be UTF-8 as it passes (close code
1007 otherwise), since the protocol object leaves that to its user.

Finishing (shutdown, idle timeout, max lifetime) echoes the frames carried by what the server
had received when the finish began (the bytes read plus the kernel's unread ones, as for TCP),
then sends a close frame (1001, going away) and closes the TCP connection once the client
answers it, or at the finish deadline.
"""

from __future__ import annotations

import codecs
import http
import logging
import time
from typing import TYPE_CHECKING, Any

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State as ProtocolState
from websockets.server import ServerProtocol
from websockets.typing import BytesLike

from echo_async.connection import (
    REASON_EOF,
    REASON_IDLE_TIMEOUT,
    REASON_MAX_BYTES,
    REASON_MAX_LIFETIME,
    REASON_SHUTDOWN,
)

if TYPE_CHECKING:
    from echo_async.connection import EchoConnection

REASON_WS_HANDSHAKE = "ws_handshake"
REASON_WS_PROTOCOL = "ws_protocol"
REASON_WS_MESSAGE_TOO_BIG = "ws_max_message"

# websockets logs each connection's opening and closing at info level: echo-async writes its own
# close record, so the protocol objects get a logger that emits nothing (and is not registered
# with logging, so no configuration can turn it on by accident).
_SILENT = logging.Logger("echo_async.websocket.protocol", logging.CRITICAL + 1)

# The close code and reason text a server-side finish sends, by the close record's reason.
_CLOSE_FOR_REASON = {
    REASON_SHUTDOWN: (CloseCode.GOING_AWAY, "going away"),
    REASON_IDLE_TIMEOUT: (CloseCode.GOING_AWAY, "idle timeout"),
    REASON_MAX_LIFETIME: (CloseCode.GOING_AWAY, "max lifetime"),
    REASON_MAX_BYTES: (CloseCode.POLICY_VIOLATION, "max bytes"),
}
_DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


class WebSocketSession:
    """The WebSocket side of one connection: handshake, frames, echo, close handshake."""

    __slots__ = (
        "answer_held",
        "close_after_message",
        "close_code",
        "connection",
        "messages_in",
        "messages_out",
        "path",
        "protocol",
        "text",
        "wire_in",
        "wire_limit",
    )

    def __init__(self, connection: EchoConnection, path: str, max_message: int) -> None:
        self.connection = connection
        self.path = path
        self.protocol = ServerProtocol(max_size=max_message or None, logger=_SILENT)
        self.messages_in = 0
        self.messages_out = 0
        self.close_code: int | None = None
        # A finish that began while a fragmented message was being echoed: its reason.
        self.close_after_message: str | None = None
        # True while echoing the data frames that came ahead of a close in the same chunk.
        self.answer_held = False
        # The UTF-8 check of a text message whose frames are still arriving.
        self.text: codecs.IncrementalDecoder | None = None
        # Bytes from the wire fed to the protocol, and how many a finish lets through.
        self.wire_in = 0
        self.wire_limit = float("inf")

    # -- input ---------------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Bytes from the client (the connection is OPEN or FINISHING)."""
        self.wire_in += len(data)
        protocol = self.protocol
        was_open = protocol.state is ProtocolState.OPEN
        protocol.receive_data(data)
        held: list[bytes] = []
        if was_open and protocol.state is not ProtocolState.OPEN:
            # The protocol answers a close (or fails) as it parses, before we see the data
            # frames that came ahead of it in this chunk: those are echoed first, then its close.
            held = protocol.data_to_send()
            self.answer_held = True
        for event in protocol.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request):
                self._request(event)
        self.answer_held = False
        self._flush(held)
        if self.wire_in >= self.wire_limit:
            self.connection.send_eof()  # the finish's budget is spent: close handshake now

    def _request(self, request: Request) -> None:
        protocol = self.protocol
        connection = self.connection
        # The protocol parses what follows the request before we answer it: pongs for pings
        # sent ahead of our response are queued already, and they must follow it.
        early = protocol.data_to_send()
        if protocol.eof_sent:
            # What followed was no frame (a pipelined request), or a close: the protocol gave
            # up already, and send_response() would assert.
            self._bad_request("data after the request that is no WebSocket frame")
            return
        if request.path.partition("?")[0] != self.path:
            response = protocol.reject(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        else:
            response = protocol.accept(request)
        protocol.send_response(response)
        writes = protocol.data_to_send()
        if response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS:
            writes += early
        connection.transport.write(b"".join(writes))
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            reason = response.reason_phrase
            detail = f"HTTP {response.status_code} {reason}"
            if protocol.handshake_exc is not None:
                detail += f": {protocol.handshake_exc}"
            connection.reject(REASON_WS_HANDSHAKE, detail)
            return
        connection.owner.connection_opened(connection)

    def _frame(self, frame: Frame) -> None:
        connection = self.connection
        opcode = frame.opcode
        if opcode not in _DATA_OPCODES:
            connection.last_active = time.monotonic()  # a ping keeps an idle client alive
            if opcode is Opcode.CLOSE:
                self._close_received()
            return
        data = frame.data
        size = len(data)
        connection.bytes_in += size
        if frame.fin:
            self.messages_in += 1
        if not self._valid_text(opcode, data, frame.fin):
            return
        protocol = self.protocol
        held = self.answer_held
        if protocol.state is not ProtocolState.OPEN and not held:
            connection.discarded += size  # after our close frame nothing more is echoed
            return
        if connection.bytes_in > connection.echo_limit:
            connection.discarded += size
            if not held:
                connection.close_reason = REASON_MAX_BYTES
                connection.send_eof()
            return
        if held:
            # The state is CLOSING already, so send_text() & co. would refuse: the frame goes
            # out through send_frame(), still ahead of the held close.
            protocol.send_frame(Frame(opcode, data, frame.fin))
        elif opcode is Opcode.TEXT:
            protocol.send_text(data, frame.fin)
        elif opcode is Opcode.BINARY:
            protocol.send_binary(data, frame.fin)
        else:
            protocol.send_continuation(data, frame.fin)
        if frame.fin:
            self.messages_out += 1
            if self.close_after_message is not None and not held:
                self.close_first(self.close_after_message)  # the message is whole: close now

    def _valid_text(self, opcode: Opcode, data: BytesLike, fin: bool) -> bool:
        """Check text as it passes: invalid UTF-8 fails the connection (1007)."""
        if opcode is Opcode.TEXT:
            self.text = codecs.getincrementaldecoder("utf-8")()
        decoder = self.text
        if decoder is None:
            return True
        if fin:
            self.text = None
        try:
            decoder.decode(data, final=fin)
        except UnicodeDecodeError as error:
            self.connection.discarded += len(data)
            self.answer_held = False  # nothing after invalid text is echoed
            self.protocol.fail(CloseCode.INVALID_DATA, f"invalid UTF-8 at byte {error.start}")
            self._failed(REASON_WS_PROTOCOL, "invalid UTF-8 in a text message")
            return False
        return True

    def _close_received(self) -> None:
        protocol = self.protocol
        connection = self.connection
        close = protocol.close_rcvd
        if self.close_code is None and close is not None:
            self.close_code = int(close.code)
        if connection.close_reason is None:
            connection.close_reason = REASON_EOF  # the client ended it

    def _failed(self, reason: str, detail: str) -> None:
        connection = self.connection
        if connection.close_reason is None:
            connection.close_reason = reason
            connection.detail = detail

    # -- output --------------------------------------------------------------------------------

    def _flush(self, held: list[bytes] | None = None) -> None:
        """Hand what the protocol wants sent to the connection; its EOF ends our side.

        `held` is protocol output taken earlier that must follow what it queued since.
        """
        protocol = self.protocol
        if protocol.parser_exc is not None and self.connection.close_reason is None:
            error = protocol.parser_exc
            too_big = protocol.close_sent is not None and (
                protocol.close_sent.code == CloseCode.MESSAGE_TOO_BIG
            )
            self._failed(REASON_WS_MESSAGE_TOO_BIG if too_big else REASON_WS_PROTOCOL, str(error))
        if protocol.close_sent is not None and self.close_code is None:
            self.close_code = int(protocol.close_sent.code)
        writes = protocol.data_to_send()
        if held:
            writes += held
        if not writes:
            return
        connection = self.connection
        end = not writes[-1]
        data = b"".join(writes)
        if data:
            connection.echo(data)
        if end:
            if not self.opened and protocol.handshake_exc is not None:
                if data:  # the protocol sent its own answer (414, 431)
                    status = data.partition(b"\r\n")[0].decode("latin-1").partition(" ")[2]
                    detail = f"HTTP {status}: {protocol.handshake_exc}"
                    connection.reject(REASON_WS_HANDSHAKE, detail)
                else:
                    self._bad_request(str(protocol.handshake_exc))
                return
            connection.send_eof()

    def _bad_request(self, why: str) -> None:
        """A request we can't answer with the protocol: we send a 400 ourselves, then close."""
        protocol = self.protocol
        connection = self.connection
        response = protocol.reject(http.HTTPStatus.BAD_REQUEST, "Bad Request\n")
        connection.transport.write(response.serialize())
        connection.reject(REASON_WS_HANDSHAKE, f"HTTP 400 Bad Request: {why}")

    @property
    def opened(self) -> bool:
        """The opening handshake succeeded (101 sent); it stays so through the close."""
        return self.protocol.state is not ProtocolState.CONNECTING

    def greet(self, text: bytes) -> None:
        """Send the greeting as the first text message (without its newline)."""
        self.protocol.send_text(text.rstrip(b"\n"))
        self._flush()

    # -- control from the connection -----------------------------------------------------------

    def finish(self, unread: int) -> None:
        """A finish began: echo what `unread` more bytes from the wire carry, then close."""
        self.wire_limit = self.wire_in + unread

    def close_first(self, reason: str | None) -> bool:
        """Before the connection sends its TCP FIN: True while a WebSocket close must come first.

        Sends our close frame (once), and says to wait for the client's while the close
        handshake is under way; False once the protocol is done, or never got past the opening
        handshake, so the FIN goes out.
        """
        protocol = self.protocol
        state = protocol.state
        if state is ProtocolState.OPEN:
            if protocol.expect_continuation_frame and reason != REASON_MAX_BYTES:
                # We are echoing a fragmented message: a close now would cut it (RFC 6455 allows
                # that, many clients fail the connection). The close follows its last fragment,
                # within the finish deadline (see _frame). --max-bytes ends it mid-message.
                self.close_after_message = reason or ""
                return True
            code, text = _CLOSE_FOR_REASON.get(reason or "", (CloseCode.NORMAL_CLOSURE, ""))
            protocol.send_close(code, text)
            self._flush()
            return not protocol.eof_sent
        if state is ProtocolState.CLOSING:
            return not protocol.eof_sent
        return False

    def handshake_timed_out(self) -> None:
        """The client sent no complete opening handshake in time."""
        self.connection.reject(REASON_WS_HANDSHAKE, "no WebSocket handshake in time")

    def fields(self) -> dict[str, Any]:
        """The close record's WebSocket fields."""
        return {
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "close_code": self.close_code,
        }
