"""The byte path: every byte comes back, in order and unchanged, over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echo_async import EchoServer, ServerConfig
from tests.conftest import echo_once, wait_for


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 64 * 1024, 16 * 1024 * 1024])
async def test_random_binary_round_trips_byte_exact(server: EchoServer, size: int) -> None:
    payload = os.urandom(size)
    assert await echo_once(server.port, payload) == payload


async def test_textbook_client_gets_its_sentence_back(server: EchoServer) -> None:
    sentence = "héllo, wörld — not ASCII, not even one recv of the textbook's 1024 bytes".encode()

    def textbook_client() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.connect(("127.0.0.1", server.port))
            client.sendall(sentence)
            return client.recv(1024)

    assert await asyncio.to_thread(textbook_client) == sentence


async def test_invalid_utf8_and_every_byte_value_survive(server: EchoServer) -> None:
    payload = bytes(range(256)) * 8 + b"\xff\xfe\x00\xc3\x28"
    assert await echo_once(server.port, payload) == payload


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    payload=st.binary(min_size=0, max_size=200_000),
    cuts=st.lists(st.integers(min_value=0, max_value=200_000), max_size=20),
)
async def test_payload_written_in_random_pieces_comes_back_whole(
    payload: bytes, cuts: list[int]
) -> None:
    async with EchoServer(ServerConfig(host="127.0.0.1", port=0)) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        bounds = sorted({0, len(payload), *(c for c in cuts if c < len(payload))})
        for start, end in itertools.pairwise(bounds):
            writer.write(payload[start:end])
            await writer.drain()
        writer.write_eof()
        assert await reader.read() == payload
        writer.close()
        await writer.wait_closed()


async def test_half_close_gets_everything_back_then_eof(server: EchoServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    payload = os.urandom(300_000)
    writer.write(payload)
    writer.write_eof()
    received = await reader.readexactly(len(payload))
    assert received == payload
    assert await reader.read() == b""  # EOF from the server once it echoed everything
    writer.close()
    await writer.wait_closed()


async def test_interactive_exchange_keeps_connection_open(server: EchoServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for round_trip in range(50):
        message = os.urandom(random.Random(round_trip).randint(1, 5000))
        writer.write(message)
        assert await reader.readexactly(len(message)) == message
    writer.close()
    await writer.wait_closed()


async def test_thousand_concurrent_clients_every_byte_checked(server: EchoServer) -> None:
    clients = 1000
    payloads = [os.urandom(2048) + index.to_bytes(4, "big") for index in range(clients)]
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(clients):
        connections.append(await asyncio.open_connection("127.0.0.1", server.port))
    await wait_for(lambda: server.stats.connections_active == clients)

    async def exchange(index: int) -> bytes:
        reader, writer = connections[index]
        writer.write(payloads[index])
        writer.write_eof()
        received = await reader.read()
        writer.close()
        return received

    echoed = await asyncio.gather(*(exchange(index) for index in range(clients)))
    assert echoed == payloads
    await wait_for(lambda: server.stats.connections_active == 0)
    stats = server.stats
    assert stats.connections_total == clients
    assert stats.bytes_in == stats.bytes_out == sum(map(len, payloads))


async def test_accepted_sockets_have_tcp_nodelay(server: EchoServer) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await wait_for(lambda: server.stats.connections_active == 1)
    (connection,) = server._state.connections
    sock: Any = connection.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    writer.close()
    await writer.wait_closed()
