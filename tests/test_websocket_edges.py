"""Edges of the ws:// listener: frames around a close, pipelined requests, stalled closes."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from echo_async import EchoServer, ServerConfig
from echo_async.connection import State
from tests.conftest import wait_for
from tests.test_transports import closed

IO_TIMEOUT_S = 10.0


def ws_config(**extra: Any) -> ServerConfig:
    settings: dict[str, Any] = {"shutdown_timeout": 5, **extra}
    return ServerConfig(listen=("ws://127.0.0.1:0/echo",), **settings)


def opening_handshake(path: str = "/echo") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def client_frame(opcode: Opcode, data: bytes = b"", fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


def server_frames(data: bytes) -> list[tuple[str, bytes]]:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while True:
        parser = Frame.parse(reader.read_exact, mask=False, max_size=None, extensions=[])
        try:
            while True:
                next(parser)
        except StopIteration as done:
            frames.append((done.value.opcode.name, bytes(done.value.data)))
        except EOFError:
            return frames


async def test_a_message_right_before_the_close_frame_is_echoed_before_the_close() -> None:
    async with EchoServer(ws_config()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(opening_handshake())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        # One write, so one read on the server: the protocol sees the close with the message.
        close = Close(1000, "").serialize()
        writer.write(client_frame(Opcode.TEXT, b"last words") + client_frame(Opcode.CLOSE, close))
        answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT_S)
        writer.close()
        assert server_frames(answer) == [("TEXT", b"last words"), ("CLOSE", close)]
        # The usual client code: send, then close at once.
        async with connect(server.addresses[0]) as ws:
            await ws.send("bye")
            await ws.close()
            assert [message async for message in ws] == ["bye"]
        assert server.stats.bytes_out == server.stats.bytes_in == len("last words") + 3


@pytest.mark.parametrize(
    "request_bytes",
    [opening_handshake("/other") * 2, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n" * 2],
    ids=["wrong-path", "plain-http"],
)
async def test_a_pipelined_request_gets_an_http_answer_not_a_traceback(
    request_bytes: bytes, loop_errors: list[dict[str, Any]]
) -> None:
    async with EchoServer(ws_config()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_bytes)
        answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT_S)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 4")
        await wait_for(lambda: not server._state.connections)
        assert server.stats.connections_rejected == 1
    assert loop_errors == []


async def test_a_ping_sent_with_the_handshake_is_answered_after_the_101() -> None:
    async with EchoServer(ws_config()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(opening_handshake() + client_frame(Opcode.PING, b"p"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
        assert head.startswith(b"HTTP/1.1 101")
        pong = await asyncio.wait_for(reader.readexactly(3), IO_TIMEOUT_S)
        assert server_frames(pong) == [("PONG", b"p")]
        writer.close()


async def test_a_request_the_protocol_answers_itself_gets_one_response(
    logs: list[dict[str, Any]],
) -> None:
    async with EchoServer(ws_config()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT_S)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert answer.count(b"HTTP/1.1 ") == 1
    (record,) = closed(logs)
    assert record["detail"].startswith("HTTP 431 ")


async def test_a_client_that_stops_reading_after_its_close_is_dropped_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("echo_async.connection.FINISH_TIMEOUT_S", 0.5)
    async with EchoServer(ws_config(idle_timeout=0.5)) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, opening_handshake())
        await wait_for(lambda: len(server._state.connections) == 1)
        (connection,) = server._state.connections
        await wait_for(lambda: connection.websocket.opened)
        # It reads nothing: fill the kernel buffers and part of the server's queue, then close.
        while connection.transport.get_write_buffer_size() < 64 * 1024:
            await loop.sock_sendall(sock, client_frame(Opcode.BINARY, b"x" * 16384))
            await asyncio.sleep(0.01)
        close = client_frame(Opcode.CLOSE, Close(1000, "").serialize())
        await loop.sock_sendall(sock, close)
        await wait_for(lambda: connection.state is State.LINGERING)
        # Neither lingering (its queue never empties) nor --idle-timeout (not OPEN) applies:
        # only a finish deadline can end it.
        await wait_for(lambda: connection.state is State.CLOSED, timeout=5)
        sock.close()


async def test_bytes_out_stays_positive_when_a_ping_flood_is_aborted() -> None:
    async with EchoServer(ws_config(idle_timeout=0.5)) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(opening_handshake())
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
        writer.transport.pause_reading()  # and never reads again
        await wait_for(lambda: len(server._state.connections) == 1)
        (connection,) = server._state.connections
        pings = client_frame(Opcode.PING, b"x" * 100) * 1000
        while not connection.transport.get_write_buffer_size():
            writer.write(pings)
            await asyncio.sleep(0.01)
        await wait_for(lambda: connection.state is State.CLOSED, timeout=5)
        assert connection.close_reason == "idle_timeout"
        assert connection.bytes_out == 0
        assert server.stats.bytes_out == 0
        writer.close()


async def read_frames(reader: asyncio.StreamReader, count: int) -> list[tuple[str, bytes]]:
    """`count` whole frames from the server (unmasked, each with a short length)."""
    data = b""
    while len(server_frames(data)) < count:
        chunk = await asyncio.wait_for(reader.read(65536), IO_TIMEOUT_S)
        assert chunk, f"the server closed after {server_frames(data)}"
        data += chunk
    return server_frames(data)


@pytest.mark.parametrize("finish", ["close", "idle_timeout"])
async def test_a_finish_mid_message_closes_after_its_last_fragment(finish: str) -> None:
    # Closing while a fragmented message is being echoed would cut it; the close waits for it.
    config = ws_config(idle_timeout=0.5 if finish == "idle_timeout" else 300)
    server = EchoServer(config)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(opening_handshake())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.write(client_frame(Opcode.TEXT, b"first half, ", fin=False))
        assert await read_frames(reader, 1) == [("TEXT", b"first half, ")]
        (connection,) = server._state.connections
        closing = asyncio.create_task(server.close()) if finish == "close" else None
        await wait_for(lambda: connection.state is State.FINISHING, timeout=5)
        writer.write(client_frame(Opcode.CONT, b"second half", fin=True))
        frames = await read_frames(reader, 2)
        assert frames[0] == ("CONT", b"second half")
        assert frames[1][0] == "CLOSE"
        assert Close.parse(frames[1][1]).code == 1001
        writer.write(client_frame(Opcode.CLOSE, Close(1001, "").serialize()))
        assert await asyncio.wait_for(reader.read(), IO_TIMEOUT_S) == b""
        writer.close()
        if closing is not None:
            await closing
    finally:
        await server.close()
