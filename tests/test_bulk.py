"""Bulk transfers: a connection that reads big chunks switches to reading into the shared buffer.

Every test here moves several MiB so that reads are at least `BULK_READ` bytes, and checks every
byte: the shared buffer must never hand one client's bytes to another, also when a slow reader
leaves part of a chunk queued (a view into the buffer) while other clients keep reading.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from echo_async import EchoServer, ServerConfig
from echo_async.connection import BulkEchoConnection, EchoConnection
from echo_async.faults import FaultyConnection
from tests.conftest import echo_once, wait_for

MiB = 1024 * 1024


def closed_records(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in logs if record["event"] == "connection closed"]


async def slow_echo(port: int, payload: bytes, read_size: int = 16384) -> bytes:
    """Send `payload` while reading the echo slowly through a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    async def receive() -> bytes:
        pieces = []
        while chunk := await reader.read(read_size):
            pieces.append(chunk)
            await asyncio.sleep(0.0005)
        return b"".join(pieces)

    try:
        _, echoed = await asyncio.gather(send(), receive())
        return echoed
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_bulk_transfer_reads_in_place_and_comes_back_exact(server: EchoServer) -> None:
    payload = os.urandom(8 * MiB)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(payload)
    echoed = await reader.readexactly(len(payload))
    assert echoed == payload
    (connection,) = server._state.connections
    assert type(connection) is BulkEchoConnection
    # Small chunks after the switch still come straight back.
    writer.write(b"small")
    assert await reader.readexactly(5) == b"small"
    writer.close()
    await writer.wait_closed()


async def test_a_bulk_transfer_really_reads_into_the_shared_buffer(
    server: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The class check above passes whatever the loop does with the class. uvloop reads into
    # get_buffer only for a protocol that is not an asyncio.Protocol: with EchoConnection made
    # one, buffer_updated ran 0 times in 300 chunks. So count what the loop actually calls.
    calls = {"get_buffer": 0, "buffer_updated": 0, "in_place": 0, "plain": 0}
    get_buffer = BulkEchoConnection.get_buffer
    buffer_updated = BulkEchoConnection.buffer_updated
    data_received = EchoConnection.data_received

    def counting_get_buffer(self: BulkEchoConnection, sizehint: int) -> memoryview:
        calls["get_buffer"] += 1
        return get_buffer(self, sizehint)

    def counting_buffer_updated(self: BulkEchoConnection, nbytes: int) -> None:
        calls["buffer_updated"] += 1
        calls["in_place"] += nbytes
        buffer_updated(self, nbytes)

    def counting_data_received(self: EchoConnection, data: bytes) -> None:
        calls["plain"] += len(data)
        data_received(self, data)

    # Patched on the classes before the connection exists: uvloop binds the methods when the
    # connection switches over (set_protocol), asyncio looks them up on every read.
    monkeypatch.setattr(BulkEchoConnection, "get_buffer", counting_get_buffer)
    monkeypatch.setattr(BulkEchoConnection, "buffer_updated", counting_buffer_updated)
    monkeypatch.setattr(EchoConnection, "data_received", counting_data_received)
    payload = os.urandom(8 * MiB)
    assert await echo_once(server.port, payload) == payload
    assert calls["plain"] + calls["in_place"] == len(payload)
    # The first big read switches the connection; after it every read lands in the buffer.
    assert calls["buffer_updated"] >= 1
    assert calls["get_buffer"] >= calls["buffer_updated"]
    assert calls["in_place"] >= len(payload) // 2, calls


async def test_small_chunks_keep_the_plain_path(server: EchoServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for _ in range(50):
        writer.write(b"x" * 1024)
        assert await reader.readexactly(1024) == b"x" * 1024
    (connection,) = server._state.connections
    assert type(connection) is EchoConnection
    writer.close()
    await writer.wait_closed()


async def test_slow_and_fast_bulk_clients_never_get_each_others_bytes(
    server: EchoServer, logs: list[dict[str, Any]]
) -> None:
    # The slow readers' echo cannot all be sent at once, so part of a chunk stays queued as a
    # view into the shared buffer while the fast clients' reads arrive: the buffer must be
    # renewed, never overwritten under the queue.
    payloads = [os.urandom(4 * MiB + index) for index in range(6)]
    echoes = await asyncio.gather(
        *(slow_echo(server.port, payload) for payload in payloads[:3]),
        *(echo_once(server.port, payload) for payload in payloads[3:]),
    )
    for payload, echoed in zip(payloads, echoes, strict=True):
        assert len(echoed) == len(payload)
        assert echoed == payload
    await wait_for(lambda: len(closed_records(logs)) == len(payloads))
    for record in closed_records(logs):
        assert record["bytes_in"] == record["bytes_out"]
        assert record["reason"] == "eof"
    assert server.stats.bytes_out == sum(len(payload) for payload in payloads)


async def test_max_bytes_is_exact_on_the_bulk_path(logs: list[dict[str, Any]]) -> None:
    budget = 3 * MiB + 17
    config = ServerConfig(host="127.0.0.1", port=0, max_bytes=budget)
    async with EchoServer(config) as server:
        payload = os.urandom(8 * MiB)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def send() -> None:
            # The server stops reading after its budget and closes: the rest may be refused.
            try:
                writer.write(payload)
                await writer.drain()
            except ConnectionError:
                pass

        _, echoed = await asyncio.gather(send(), reader.read())
        writer.close()
        assert echoed == payload[:budget]
        await wait_for(lambda: bool(closed_records(logs)))
    (record,) = closed_records(logs)
    assert record["reason"] == "max_bytes"
    assert record["bytes_out"] == budget


async def test_shutdown_during_a_bulk_transfer_flushes_then_sends_eof(
    logs: list[dict[str, Any]],
) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=5)
    server = EchoServer(config)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    payload = os.urandom(32 * MiB)

    async def send() -> None:
        try:
            for start in range(0, len(payload), MiB):
                writer.write(payload[start : start + MiB])
                await writer.drain()
        except ConnectionError:
            pass

    sending = asyncio.create_task(send())
    received = bytearray()
    while len(received) < 2 * MiB:
        received += await reader.read(MiB)
    (connection,) = server._state.connections
    assert type(connection) is BulkEchoConnection
    closing = asyncio.create_task(server.close())
    while chunk := await reader.read(MiB):
        received += chunk
    await closing
    sending.cancel()
    writer.close()
    # Everything echoed is a prefix of what was sent, and the record counts exactly that.
    assert bytes(received) == payload[: len(received)]
    (record,) = closed_records(logs)
    assert record["reason"] == "shutdown"
    assert record["bytes_out"] == len(received)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], ssl.SSLContext]:
    authority = trustme.CA()
    certificate = authority.issue_cert("localhost", "127.0.0.1")
    directory = tmp_path_factory.mktemp("tls")
    cert, key, ca = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(ca))
    client = ssl.create_default_context(cafile=str(ca))
    return {"tls_cert": str(cert), "tls_key": str(key)}, client


async def test_bulk_over_tls_and_unix_comes_back_exact(
    tls_pair: tuple[dict[str, str], ssl.SSLContext], tmp_path: Path
) -> None:
    files, client_context = tls_pair
    path = tmp_path / "echo.sock"
    config = ServerConfig(
        listen=("tls://127.0.0.1:0", f"unix://{path}"),
        tls_cert=files["tls_cert"],
        tls_key=files["tls_key"],
    )
    payload = os.urandom(6 * MiB)
    async with EchoServer(config) as server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_context, server_hostname="localhost"
        )
        unix_reader, unix_writer = await asyncio.open_unix_connection(str(path))
        writer.write(payload)
        unix_writer.write(payload[::-1])
        tls_echo, unix_echo = await asyncio.gather(
            reader.readexactly(len(payload)), unix_reader.readexactly(len(payload))
        )
        assert tls_echo == payload
        assert unix_echo == payload[::-1]
        assert {type(connection) for connection in server._state.connections} == {
            BulkEchoConnection
        }
        for stream in (writer, unix_writer):
            stream.close()


async def test_a_connection_with_faults_never_reads_in_place() -> None:
    # Held pieces must outlive the read: the fault path keeps the loop's own bytes objects.
    config = ServerConfig(host="127.0.0.1", port=0, fault_delay=1.0)
    async with EchoServer(config) as server:
        payload = os.urandom(4 * MiB)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        (connection,) = server._state.connections
        assert type(connection) is FaultyConnection
        writer.close()
        await writer.wait_closed()
