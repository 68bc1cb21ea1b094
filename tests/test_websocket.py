"""ws:// and wss:// listeners: messages come back whole, in order, with their type; the stream
listeners' limits, timers, drain and records apply; bad handshakes get HTTP answers, not tracebacks.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from echo_async import EchoServer, ServerConfig
from echo_async.connection import State
from echo_async.metrics import ServerMetrics
from tests.conftest import wait_for
from tests.test_lifecycle import kernel_unread, unacknowledged
from tests.test_transports import client_context, closed

IO_TIMEOUT_S = 10.0
MESSAGES: list[str | bytes] = [
    "hello",
    "héllo ✓ 𝄞",
    "",
    bytes(range(256)),
    b"",
    os.urandom(300 * 1024),
    "t" * 70_000,
    b"\xff\xfe binary that is not UTF-8",
]


def ws_config(**extra: Any) -> ServerConfig:
    settings: dict[str, Any] = {"shutdown_timeout": 5, **extra}
    return ServerConfig(listen=("ws://127.0.0.1:0/echo",), **settings)


async def round_trip(ws: ClientConnection, messages: list[Any]) -> list[Any]:
    """Send every message first (pipelined), then read as many replies."""
    for message in messages:
        await ws.send(message)
    return [await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S) for _ in messages]


async def echo_until_closed(ws: ClientConnection, message: Any, pause: float = 0.0) -> None:
    """Round trips until the server ends the connection; fail if it never does."""
    for _ in range(500):
        try:
            await ws.send(message)
            await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S)
        except ConnectionClosed:
            return
        await asyncio.sleep(pause)
    raise AssertionError("the server never ended the connection")


def assert_same_messages(received: list[Any], sent: list[Any]) -> None:
    assert [type(m) for m in received] == [type(m) for m in sent]  # text stays text
    assert received == sent


async def test_messages_come_back_whole_in_order_with_their_type(
    logs: list[dict[str, Any]],
) -> None:
    async with EchoServer(ws_config()) as server:
        (url,) = server.addresses
        assert url == f"ws://127.0.0.1:{server.port}/echo"
        async with connect(url, max_size=None) as ws:
            assert_same_messages(await round_trip(ws, MESSAGES), MESSAGES)
            # Fragmented messages come back as one message each, of the same type.
            await ws.send(["frag", "mented ", "text"])
            await ws.send([b"frag", b"mented ", b"binary"])
            assert await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S) == "fragmented text"
            assert await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S) == b"fragmented binary"
            # Many small messages in flight at once keep their order.
            many = [f"message {i}" if i % 2 else f"{i}".encode() for i in range(500)]
            assert_same_messages(await round_trip(ws, many), many)
    (record,) = closed(logs)
    payload = sum(len(m.encode() if isinstance(m, str) else m) for m in MESSAGES + many)
    payload += len("fragmented text") + len(b"fragmented binary")
    count = len(MESSAGES) + 2 + len(many)
    assert record["transport"] == "ws"
    assert record["peer"].startswith("127.0.0.1:")
    assert record["bytes_in"] == record["bytes_out"] == payload
    assert record["messages_in"] == record["messages_out"] == count
    assert record["reason"] == "eof"
    assert record["close_code"] == 1000
    assert record["duration_s"] > 0


async def test_wrong_path_plain_http_and_garbage_get_http_answers(
    logs: list[dict[str, Any]],
) -> None:
    async with EchoServer(ws_config()) as server:
        with pytest.raises(InvalidStatus) as wrong_path:
            async with connect(f"ws://127.0.0.1:{server.port}/other"):
                pass
        assert wrong_path.value.response.status_code == 404

        async def raw(request: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT_S)
            writer.close()
            return answer

        plain = await raw(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert plain.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
        assert b"WebSocket" in plain
        garbage = await raw(b"\x16\x03\x01\x00\xa5 not http at all\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert server.stats.connections_rejected == 3
        assert server.stats.connections_total == 0  # none was served
        async with connect(server.addresses[0]) as ws:  # and the listener still serves
            assert await round_trip(ws, ["still here"]) == ["still here"]
    records = [r for r in closed(logs) if r["reason"] == "ws_handshake"]
    assert sorted(r["detail"].split(":")[0] for r in records) == [
        "HTTP 400 Bad Request",
        "HTTP 404 Not Found",
        "HTTP 426 Upgrade Required",
    ]


async def test_a_message_over_the_limit_closes_with_1009(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(ws_config(ws_max_message=1000)) as server:
        async with connect(server.addresses[0]) as ws:
            assert await round_trip(ws, [b"x" * 1000]) == [b"x" * 1000]
            await ws.send(b"x" * 1001)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S)
            assert ws.close_code == 1009
        # Fragments count towards the message: three of 400 bytes are over 1000 too.
        async with connect(server.addresses[0]) as ws:
            await ws.send([b"y" * 400] * 3)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S)
            assert ws.close_code == 1009
    records = closed(logs)
    assert [r["reason"] for r in records] == ["ws_max_message"] * 2
    assert [r["close_code"] for r in records] == [1009, 1009]


async def test_text_that_is_not_utf8_closes_with_1007(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(ws_config()) as server:
        async with connect(server.addresses[0]) as ws:
            await ws.send(b"valid \xe2\x9c", text=True)  # a character cut short, last frame
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S)
            assert ws.close_code == 1007
        async with connect(server.addresses[0]) as ws:
            # Split inside a character across fragments is valid text and comes back whole.
            await ws.send([b"caf\xc3", b"\xa9"], text=True)
            assert await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S) == "café"
    (record, _) = closed(logs)
    assert record["reason"] == "ws_protocol"
    assert record["close_code"] == 1007


async def test_the_greeting_is_a_first_text_message() -> None:
    async with EchoServer(ws_config(greeting="backend-{port}")) as server:
        ws = await connect(server.addresses[0])
        assert await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S) == f"backend-{server.port}"
        assert await round_trip(ws, [b"\x00"]) == [b"\x00"]
        await ws.close()


async def test_a_drain_echoes_what_was_received_then_closes_with_1001(
    logs: list[dict[str, Any]],
) -> None:
    # The client sends and reads nothing: backpressure pauses the server's reading, so part of
    # what it sent waits in the server's kernel. Every message acknowledged before the close
    # began comes back, in order, then a 1001 close.
    server = EchoServer(ws_config(shutdown_timeout=20))
    await server.start()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", server.port))
        ws = await connect(server.addresses[0], sock=sock, ping_interval=None, max_size=None)
        ws.transport.pause_reading()
        await wait_for(lambda: len(server._state.connections) == 1)
        (connection,) = server._state.connections
        sent: list[bytes] = []
        # More unread than one read of the server's (256 KiB), so the finish's budget, not the
        # size of a read, decides what comes back. A fixed 1 MiB receive buffer (the kernel
        # doubles it) gives the window room for that, whatever autotuning would have done.
        server_socket = connection.transport.get_extra_info("socket")
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        while kernel_unread(connection.transport) < 512 * 1024:
            assert len(sent) < 2000, "the server's kernel never held unread bytes"
            message = os.urandom(16 * 1024)
            sent.append(message)
            await ws.send(message)
            await wait_for(
                lambda: ws.transport.get_write_buffer_size() == 0 and unacknowledged(sock) == 0,
                timeout=10,
            )
        closing = asyncio.create_task(server.close())
        await wait_for(lambda: connection.state is not State.OPEN, timeout=10)
        ws.transport.resume_reading()
        received = [message async for message in ws]  # ends at a 1000 or 1001 close
        assert ws.close_code == 1001
        assert len(received) == len(sent)
        assert received == sent
        await closing
    finally:
        await server.close()
    (record,) = closed(logs)
    assert record["reason"] == "shutdown"
    assert record["close_code"] == 1001
    assert record["messages_in"] == record["messages_out"] == len(sent)
    (summary,) = [r for r in logs if r["event"] == "server closed"]
    assert summary["aborted_at_shutdown"] == 0


async def test_idle_timeout_and_max_lifetime_close_with_1001(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(ws_config(idle_timeout=0.3)) as server:
        ws = await connect(server.addresses[0], ping_interval=None)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S)
        assert (ws.close_code, ws.close_reason) == (1001, "idle timeout")
    async with EchoServer(ws_config(max_lifetime=0.3)) as server:
        ws = await connect(server.addresses[0])
        await echo_until_closed(ws, "busy", pause=0.02)
        assert (ws.close_code, ws.close_reason) == (1001, "max lifetime")
    assert [r["reason"] for r in closed(logs)] == ["idle_timeout", "max_lifetime"]


async def test_max_bytes_closes_with_1008_after_what_fits() -> None:
    async with EchoServer(ws_config(max_bytes=10)) as server:
        async with connect(server.addresses[0]) as ws:
            assert await round_trip(ws, [b"12345", b"67890"]) == [b"12345", b"67890"]
            await ws.send(b"!")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), IO_TIMEOUT_S)
            assert ws.close_code == 1008
        assert server.stats.bytes_out == 10


async def test_connection_limits_and_handshake_timeout_apply(
    logs: list[dict[str, Any]],
) -> None:
    config = ws_config(max_connections=1, ws_handshake_timeout=0.3)
    async with EchoServer(config) as server:
        async with connect(server.addresses[0]) as ws:
            with pytest.raises((InvalidMessage, ConnectionClosed, OSError)):
                async with connect(server.addresses[0], open_timeout=IO_TIMEOUT_S):
                    pass
            assert await round_trip(ws, ["served"]) == ["served"]
        rejected = [r for r in logs if r["event"] == "connection rejected"]
        assert [(r["transport"], r["limit"]) for r in rejected] == [("ws", "max_connections")]
        # A client that never sends its opening handshake is closed in time.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), IO_TIMEOUT_S) == b""
        writer.close()
    record = closed(logs)[-1]
    assert record["reason"] == "ws_handshake"
    assert record["detail"] == "no WebSocket handshake in time"


async def test_wss_echoes_and_records_what_tls_negotiated(
    tls_files: dict[str, str], logs: list[dict[str, Any]]
) -> None:
    metrics = ServerMetrics(CollectorRegistry())
    config = ServerConfig(
        listen=("wss://127.0.0.1:0/", "ws://127.0.0.1:0/"),
        tls_cert=tls_files["tls_cert"],
        tls_key=tls_files["tls_key"],
    )
    async with EchoServer(config, metrics=metrics) as server:
        secure, plain = server.addresses
        assert secure == f"wss://127.0.0.1:{secure.split(':')[2].rstrip('/')}/"
        context = client_context(tls_files["ca"])
        async with connect(secure, ssl=context) as ws:
            assert_same_messages(await round_trip(ws, MESSAGES), MESSAGES)
        async with connect(plain) as ws:
            assert await round_trip(ws, [b"12345"]) == [b"12345"]
    sample = metrics.registry.get_sample_value
    assert sample("echo_connections_total", {"transport": "wss"}) == 1
    assert sample("echo_bytes_received_total", {"transport": "ws"}) == 5
    assert sample("echo_bytes_sent_total", {"transport": "ws"}) == 5
    secure_record = next(r for r in closed(logs) if r["transport"] == "wss")
    assert secure_record["tls_version"].startswith("TLSv1.")
    assert secure_record["messages_out"] == len(MESSAGES)


async def test_a_proxy_header_comes_before_the_websocket_handshake(
    logs: list[dict[str, Any]],
) -> None:
    async with EchoServer(ws_config(proxy_protocol="required")) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n")
        async with connect(server.addresses[0], sock=sock) as ws:
            assert await round_trip(ws, ["behind a balancer"]) == ["behind a balancer"]
    (record,) = closed(logs)
    assert record["peer"] == "203.0.113.7:40000"
    assert record["proxy"].startswith("127.0.0.1:")


@pytest.mark.parametrize(
    "faults", [{"fault_delay": 30.0, "fault_jitter": 20.0}, {"fault_chunk": 7}]
)
async def test_faults_keep_messages_and_the_close_handshake_intact(faults: dict[str, Any]) -> None:
    async with EchoServer(ws_config(fault_seed=1, **faults)) as server:
        async with connect(server.addresses[0]) as ws:
            messages = [f"{i}" * 50 if i % 2 else os.urandom(5000) for i in range(40)]
            assert_same_messages(await round_trip(ws, messages), messages)
            await ws.send("last")  # closing with an echo still held: it comes first, then close
        assert ws.close_code == 1000


async def test_a_reset_fault_drops_the_connection_after_n_bytes(
    logs: list[dict[str, Any]],
) -> None:
    async with EchoServer(ws_config(fault_reset_after=100)) as server:
        ws = await connect(server.addresses[0])
        await echo_until_closed(ws, b"z" * 40)
        assert ws.close_code == 1006  # no close frame: the TCP connection was reset
    (record,) = closed(logs)
    assert record["reason"] == "fault_reset"


async def test_the_pytest_fixture_starts_a_websocket_listener(echo_server_factory: Any) -> None:
    server = await echo_server_factory(ServerConfig(listen=("ws://127.0.0.1:0/",)))
    async with connect(server.addresses[0]) as ws:
        assert await round_trip(ws, ["from a fixture"]) == ["from a fixture"]


async def test_an_inherited_socket_is_served_as_the_ws_listener_with_its_port() -> None:
    # systemd socket activation: the socket comes bound; the config says it is ws:// on /echo.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = ServerConfig(listen=(f"ws://127.0.0.1:{port}/echo", "tcp://127.0.0.1:1"))
    async with EchoServer(config, sockets=[sock]) as server:
        assert server.addresses == [f"ws://127.0.0.1:{port}/echo"]
        async with connect(server.addresses[0]) as ws:
            assert await round_trip(ws, [b"inherited"]) == [b"inherited"]
