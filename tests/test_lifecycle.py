"""A connection's life end to end: admission before TLS, no byte lost at a finish, bounded close.

Each test here was written against a defect of the earlier design (see the issue "The connection
lifecycle"); every one of them fails on that design with one loop or both.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import gc
import os
import socket
import ssl
import struct
import termios
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme
from prometheus_client import CollectorRegistry

from echo_async import ConfigError, EchoServer, ServerConfig
from echo_async.connection import State
from echo_async.metrics import ServerMetrics
from tests.conftest import wait_for
from tests.test_transports import client_context, closed, handshake_failures, tls_config

CHUNK = 256 * 1024


def unacknowledged(sock: socket.socket) -> int:
    """Bytes our kernel has sent but the peer's has not acknowledged (TIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def kernel_unread(transport: Any) -> int:
    """Bytes waiting unread in the server's kernel for this connection (SIOCINQ)."""
    fd = transport.get_extra_info("socket").fileno()
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


async def stalled_client(
    port: int, context: ssl.SSLContext | None
) -> tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a 16 KiB receive window that does not read until told to."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=context, server_hostname="localhost" if context else None
    )
    writer.transport.pause_reading()
    return sock, reader, writer


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
@pytest.mark.parametrize("finish", ["close", "max_lifetime"])
async def test_a_finish_echoes_every_byte_the_server_had_received(
    scheme: str, finish: str, tls_files: dict[str, str], logs: list[dict[str, Any]]
) -> None:
    # The client sends 2 MiB and reads nothing: backpressure pauses the server's reading, so
    # most of it waits in the server's kernel. All of it was acknowledged before the finish:
    # all of it must come back, then EOF.
    limits: dict[str, Any] = {"shutdown_timeout": 20}
    if finish == "max_lifetime":
        limits["max_lifetime"] = 1.5
    if scheme == "tls":
        config = tls_config(tls_files, **limits)
        context: ssl.SSLContext | None = client_context(tls_files["ca"])
    else:
        config = ServerConfig(host="127.0.0.1", port=0, **limits)
        context = None
    server = EchoServer(config)
    await server.start()
    try:
        sock, reader, writer = await stalled_client(server.port, context)
        await wait_for(lambda: len(server._state.connections) == 1)
        (connection,) = server._state.connections
        # Send until a good part of it waits unread in the server's kernel, all acknowledged.
        sent = bytearray()
        while kernel_unread(connection.transport) < 256 * 1024:
            assert len(sent) < 64 * CHUNK, "the server's kernel never held unread bytes"
            chunk = os.urandom(CHUNK)
            sent += chunk
            writer.write(chunk)
            await wait_for(
                lambda: writer.transport.get_write_buffer_size() == 0 and unacknowledged(sock) == 0,
                timeout=10,
            )
        payload = bytes(sent)
        closing = None
        if finish == "close":
            closing = asyncio.create_task(server.close())
        await wait_for(lambda: connection.state is not State.OPEN, timeout=10)
        writer.transport.resume_reading()
        received = await asyncio.wait_for(reader.read(), 20)
        assert len(received) == len(payload)
        assert received == payload
        writer.close()
        if closing is not None:
            await closing
    finally:
        await server.close()
    (record,) = closed(logs)
    assert record["reason"] == ("shutdown" if finish == "close" else "max_lifetime")
    (summary,) = [record for record in logs if record["event"] == "server closed"]
    assert summary["aborted_at_shutdown"] == 0  # it ended with EOF, not at the deadline
    assert record["bytes_in"] == record["bytes_out"] == len(payload)


class FailingMetrics(ServerMetrics):
    """Metrics whose per-connection update fails (multiprocess files on a full disk do)."""

    def closed(self, transport: str, duration_s: float) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_close_returns_even_when_accounting_a_connection_fails(
    loop_errors: list[dict[str, Any]], logs: list[dict[str, Any]]
) -> None:
    server = EchoServer(
        ServerConfig(host="127.0.0.1", port=0), metrics=FailingMetrics(CollectorRegistry())
    )
    await server.start()
    clients = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    for _, writer in clients:
        writer.write(b"x")
    await wait_for(lambda: server.stats.bytes_in == 3)
    await asyncio.wait_for(server.close(timeout=1), 5)
    assert server.stats.connections_active == 0
    assert len(closed(logs)) == 3  # the close records are still written
    # ...and the failure was reported, not swallowed: by the loop's handler when a batch of
    # records failed on its timer, or by close() for the batch it flushed itself.
    reported = [record for record in logs if record["event"] == "close records or metrics failed"]
    assert loop_errors or reported
    for _, writer in clients:
        writer.close()


async def test_close_keeps_its_deadline_with_tls_handshakes_in_flight(
    tls_files: dict[str, str], logs: list[dict[str, Any]]
) -> None:
    # Silent clients on a tls:// port: their handshakes would run for the handshake timeout.
    async with EchoServer(tls_config(tls_files, tls_handshake_timeout=30)) as server:
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]
        await wait_for(lambda: len(server._state.connections) == 20)
        started = time.monotonic()
        await asyncio.wait_for(server.close(timeout=0.5), 10)
        assert time.monotonic() - started < 3
        for reader, writer in silent:
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
    records = closed(logs)
    assert len(records) == 20
    assert {record["reason"] for record in records} == {"shutdown"}


async def test_connection_limits_count_tls_handshakes(
    tls_files: dict[str, str], logs: list[dict[str, Any]]
) -> None:
    config = tls_config(tls_files, max_connections=5, tls_handshake_timeout=30)
    async with EchoServer(config) as server:
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(50)]
        await wait_for(lambda: server.stats.connections_rejected == 45)
        assert server.stats.connections_active == 5
        # The 45 over the limit are closed now, not after the handshake timeout.
        ended = 0
        for reader, writer in silent:
            try:
                if await asyncio.wait_for(reader.read(), 0.2) == b"":
                    ended += 1
            except TimeoutError:
                pass
            except ConnectionResetError:
                ended += 1
            writer.close()
        assert ended == 45
        rejected = [record for record in logs if record["event"] == "connection rejected"]
        assert len(rejected) == 45
        assert {record["transport"] for record in rejected} == {"tls"}


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a TLS client, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


@pytest.fixture
def gc_disabled() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_abandoned_tls_handshakes_are_reported_at_once(
    tls_files: dict[str, str], logs: list[dict[str, Any]], gc_disabled: None
) -> None:
    # Half a ClientHello, then the client goes away: reported from the handshake itself, with
    # the peer's address, not whenever a garbage collection frees the TLS object.
    hello = client_hello(client_context(tls_files["ca"]))
    async with EchoServer(tls_config(tls_files)) as server:
        for _ in range(20):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(hello[:40])
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        await wait_for(lambda: len(handshake_failures(logs)) == 20)
        assert server.stats.connections_rejected == 20
    for failure in handshake_failures(logs):
        assert failure["reason"] == "tls_handshake"
        assert failure["peer"].startswith("127.0.0.1:")
        assert failure["error"] == "handshake not completed: the client went away"


def tls_exchange(
    port: int, context: ssl.SSLContext, header: bytes, payload: bytes, alpn: list[str] = ()
) -> bytes:
    """A blocking TLS client that sends `header` and its ClientHello in one segment."""
    if alpn:
        context.set_alpn_protocols(list(alpn))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        first = header
        while True:
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            sock.sendall(first + outgoing.read())
            first = b""
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("closed during the handshake")
            incoming.write(data)
        client.write(payload)
        sock.sendall(outgoing.read())
        received = b""
        while len(received) < len(payload):
            try:
                received += client.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
        return received


@pytest.mark.parametrize("mode", ["required", "optional"])
async def test_a_proxy_header_before_tls(
    mode: str, tls_files: dict[str, str], logs: list[dict[str, Any]]
) -> None:
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 12443\r\n"
    async with EchoServer(tls_config(tls_files, proxy_protocol=mode)) as server:
        context = client_context(tls_files["ca"])
        payload = os.urandom(3000)
        echoed = await asyncio.to_thread(tls_exchange, server.port, context, header, payload)
        assert echoed == payload
        if mode == "optional":  # a TLS client without a header is served too
            context = client_context(tls_files["ca"])
            assert await asyncio.to_thread(tls_exchange, server.port, context, b"", b"p") == b"p"
        await wait_for(lambda: len(closed(logs)) == (2 if mode == "optional" else 1))
    record = closed(logs)[0]
    assert record["peer"] == "203.0.113.7:51234"
    assert record["proxy"].startswith("127.0.0.1:")
    assert record["transport"] == "tls"
    assert record["bytes_in"] == record["bytes_out"] == 3000


async def test_the_close_record_says_what_tls_negotiated(
    certificate_authority: trustme.CA, tls_files: dict[str, str], logs: list[dict[str, Any]]
) -> None:
    config = tls_config(tls_files, tls_client_ca=tls_files["ca"], tls_alpn="echo,h2")
    client_cert = certificate_authority.issue_cert("client-a@example.org", common_name="client-a")
    context = client_context(tls_files["ca"])
    client_cert.configure_cert(context)
    async with EchoServer(config) as server:
        echoed = await asyncio.to_thread(
            tls_exchange, server.port, context, b"", b"negotiated", ["echo"]
        )
        assert echoed == b"negotiated"
        await wait_for(lambda: len(closed(logs)) == 1)
    (record,) = closed(logs)
    assert record["transport"] == "tls"
    assert record["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert record["tls_cipher"]
    assert record["tls_sni"] == "localhost"
    assert record["tls_alpn"] == "echo"
    assert record["tls_client_subject"].startswith("CN=client-a,")


async def test_plain_close_records_name_their_transport(
    tmp_path: Any, logs: list[dict[str, Any]]
) -> None:
    path = f"{tmp_path}/e.sock"
    config = ServerConfig(listen=("tcp://127.0.0.1:0", f"unix://{path}"))
    async with EchoServer(config) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await wait_for(lambda: len(closed(logs)) == 2)
    assert sorted(record["transport"] for record in closed(logs)) == ["tcp", "unix"]


# -- socket activation: every inherited socket served as what it is ---------------------------


def bound(family: socket.AddressFamily, kind: socket.SocketKind, address: Any) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.bind(address)
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


async def test_inherited_sockets_are_served_as_their_kind(
    tls_files: dict[str, str], tmp_path: Any
) -> None:
    tls_socket = bound(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0))
    tls_port = tls_socket.getsockname()[1]
    udp_socket = bound(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0))
    path = f"{tmp_path}/inherited.sock"
    unix_socket = bound(socket.AF_UNIX, socket.SOCK_STREAM, path)
    config = ServerConfig(
        listen=(f"tls://127.0.0.1:{tls_port}",),
        tls_cert=tls_files["tls_cert"],
        tls_key=tls_files["tls_key"],
    )
    sockets = [tls_socket, udp_socket, unix_socket]
    async with EchoServer(config, sockets=sockets) as server:
        assert server.addresses == [
            f"tls://127.0.0.1:{tls_port}",
            f"udp://127.0.0.1:{udp_socket.getsockname()[1]}",
            f"unix://{path}",
        ]
        context = client_context(tls_files["ca"])
        assert await asyncio.to_thread(tls_exchange, tls_port, context, b"", b"tls") == b"tls"

        def datagram_echo() -> bytes:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.sendto(b"datagram", udp_socket.getsockname())
                return client.recv(100)

        assert await asyncio.to_thread(datagram_echo) == b"datagram"
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"unix")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"unix"
        writer.close()


async def test_an_inherited_socket_of_ambiguous_scheme_is_refused(
    tls_files: dict[str, str],
) -> None:
    sock = bound(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0))
    config = ServerConfig(
        listen=("tcp://127.0.0.1:1", "tls://127.0.0.1:2"),
        tls_cert=tls_files["tls_cert"],
        tls_key=tls_files["tls_key"],
    )
    server = EchoServer(config, sockets=[sock])
    with pytest.raises(ConfigError, match="tcp://, tls://"):
        await server.start()
    sock.close()


async def test_a_client_gone_before_its_tls_handshake_frees_its_slot_at_once(
    tls_files: dict[str, str], logs: list[dict[str, Any]]
) -> None:
    # Half a PROXY header, then EOF: the header stage ends (optional mode) as the plain socket
    # closes, before the TLS layer could take it over.
    config = tls_config(
        tls_files, proxy_protocol="optional", max_connections_per_ip=1, tls_handshake_timeout=30
    )
    async with EchoServer(config) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"PROXY ")
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await wait_for(lambda: not server._state.connections)
        context = client_context(tls_files["ca"])
        assert await asyncio.to_thread(tls_exchange, server.port, context, b"", b"next") == b"next"
    first, second = closed(logs)
    assert (first["reason"], first["bytes_in"], first["bytes_out"]) == ("eof", 0, 0)
    assert first["error"] == "handshake not completed: the client went away"
    assert second["bytes_out"] == 4
