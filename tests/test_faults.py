"""Fault injection and backend identity: misbehaving on purpose, still byte-exact and ordered."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from echo_async import ConfigError, EchoServer, ServerConfig
from echo_async.metrics import ServerMetrics
from tests.conftest import echo_once


def closed(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in logs if record["event"] == "connection closed"]


async def test_greeting_comes_first_then_pure_echo() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, greeting="backend-{port}-w{worker}")
    async with EchoServer(config) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await reader.readline() == f"backend-{server.port}-w0\n".encode()
        payload = os.urandom(50_000)
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        writer.close()


async def test_no_greeting_by_default(server: EchoServer) -> None:
    assert await echo_once(server.port, b"pure") == b"pure"


@pytest.mark.parametrize("greeting", ["two\nlines", "{nope}", "{0}"])
def test_bad_greetings_are_config_errors(greeting: str) -> None:
    with pytest.raises(ConfigError, match=r"^greeting: ") as raised:
        ServerConfig(greeting=greeting)
    assert raised.value.field == "greeting"


async def test_delay_holds_each_chunk(logs: list[dict[str, Any]]) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, fault_delay=150)
    async with EchoServer(config) as server:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = loop.time()
        writer.write(b"late")
        assert await reader.readexactly(4) == b"late"
        assert loop.time() - started >= 0.14  # held on purpose; never an upper bound
        writer.close()
    (record,) = closed(logs)
    assert record["faults_injected"] == {"delay": 1}


async def test_jitter_never_reorders_bytes() -> None:
    config = ServerConfig(
        host="127.0.0.1", port=0, fault_delay=1, fault_jitter=30, fault_chunk=100, fault_seed=7
    )
    async with EchoServer(config) as server:
        payload = os.urandom(20_000)
        assert await echo_once(server.port, payload) == payload


async def test_chunk_writes_small_pieces(logs: list[dict[str, Any]]) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, fault_chunk=10)
    async with EchoServer(config) as server:
        payload = os.urandom(95)
        assert await echo_once(server.port, payload) == payload
    (record,) = closed(logs)
    assert record["faults_injected"]["chunk"] >= 10  # 95 bytes in pieces of at most 10


async def test_rate_caps_the_echo(logs: list[dict[str, Any]]) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, fault_rate=20_000, fault_chunk=1000)
    async with EchoServer(config) as server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        payload = os.urandom(10_000)
        assert await echo_once(server.port, payload) == payload
        # 10 kB at 20 kB/s: at least ~0.45 s (a lower bound only: slow machines are slower).
        assert loop.time() - started >= 0.4
    (record,) = closed(logs)
    assert record["faults_injected"]["rate"] >= 8


async def test_reset_after_exactly_n_bytes(logs: list[dict[str, Any]]) -> None:
    metrics = ServerMetrics(CollectorRegistry())
    config = ServerConfig(host="127.0.0.1", port=0, fault_reset_after=1000)
    async with EchoServer(config, metrics=metrics) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(os.urandom(5000))
        received = bytearray()

        async def read_until_reset() -> None:
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                received.extend(chunk)

        with pytest.raises(ConnectionResetError):
            await read_until_reset()
        assert len(received) == 1000
        writer.close()
    (record,) = closed(logs)
    assert record["reason"] == "fault_reset"
    assert record["faults_injected"] == {"reset": 1}
    assert metrics.registry.get_sample_value("echo_faults_injected_total", {"kind": "reset"}) == 1


async def udp_answers(port: int, count: int, server_counts: Any) -> list[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setblocking(False)
        for index in range(count):
            client.sendto(index.to_bytes(2, "big"), ("127.0.0.1", port))
        answered: list[int] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        # Until every datagram was seen and every answer it counted has arrived.
        while server_counts() != (count, len(answered)) and loop.time() < deadline:
            try:
                answered.append(int.from_bytes(client.recv(10), "big"))
            except BlockingIOError:
                await asyncio.sleep(0.01)
        return sorted(answered)


async def test_udp_drop_is_reproducible_with_a_seed() -> None:
    config = ServerConfig(listen=("udp://127.0.0.1:0",), fault_drop=0.5, fault_seed=42, udp_rate=0)
    runs = []
    for _ in range(2):
        async with EchoServer(config) as server:
            stats = server.stats

            def counts(server: EchoServer = server) -> tuple[int, int]:
                current = server.stats
                return current.datagrams_in, current.datagrams_out

            del stats
            runs.append(await udp_answers(server.port, 200, counts))
            assert server.stats.datagrams_dropped == 200 - len(runs[-1])
    assert runs[0] == runs[1]
    assert 50 < len(runs[0]) < 150


async def test_backpressure_holds_with_faults_on() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, fault_delay=1, shutdown_timeout=0.5)
    async with EchoServer(config) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.transport.set_write_buffer_limits(high=64 * 1024 * 1024)
        writer.write(os.urandom(32 * 1024 * 1024))  # and never read
        loop = asyncio.get_running_loop()
        previous, deadline = -1, loop.time() + 20
        while server.stats.bytes_in != previous:  # until the server stops reading
            previous = server.stats.bytes_in
            await asyncio.sleep(0.3)
            assert loop.time() < deadline, "the server never stopped reading"
        (connection,) = server._state.connections
        held = connection.transport.get_write_buffer_size() + connection.pending_bytes  # type: ignore[attr-defined]
        assert held <= config.write_buffer_high * 2 + 1024 * 1024
        writer.transport.abort()
