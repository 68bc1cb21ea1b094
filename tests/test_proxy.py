"""PROXY protocol on the byte path: real client addresses behind a balancer, header never echoed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from echo_async import EchoServer, ServerConfig
from echo_async.metrics import ServerMetrics
from tests.conftest import wait_for

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source: tuple[str, int], destination: tuple[str, int], local: bool = False) -> bytes:
    command = 0x20 if local else 0x21
    body = (
        socket.inet_pton(socket.AF_INET, source[0])
        + socket.inet_pton(socket.AF_INET, destination[0])
        + struct.pack("!HH", source[1], destination[1])
    )
    return V2_SIGNATURE + bytes([command, 0x11]) + struct.pack("!H", len(body)) + body


def closed(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in logs if record["event"] == "connection closed"]


async def exchange(port: int, *writes: bytes, expect: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local_port = writer.get_extra_info("sockname")[1]
    for chunk in writes:
        writer.write(chunk)
        await writer.drain()
    received = b""
    # A rejected connection may be reset, or gone before our EOF: both are fine here.
    with contextlib.suppress(OSError):
        received = await asyncio.wait_for(reader.readexactly(expect), 5) if expect else b""
        writer.write_eof()
        received += await asyncio.wait_for(reader.read(), 5)
    writer.close()
    exchange.local_port = local_port  # type: ignore[attr-defined]
    return received


def config(mode: str, **extra: Any) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, proxy_protocol=mode, **extra)


async def test_required_v1_header_sets_peer_and_is_never_echoed(
    logs: list[dict[str, Any]],
) -> None:
    async with EchoServer(config("required")) as server:
        header = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 12000\r\n"
        payload = os.urandom(5000)
        assert await exchange(server.port, header + payload, expect=len(payload)) == payload
    (record,) = closed(logs)
    assert record["peer"] == "203.0.113.7:51234"
    assert record["proxy"] == f"127.0.0.1:{exchange.local_port}"  # type: ignore[attr-defined]
    assert record["bytes_in"] == record["bytes_out"] == 5000


async def test_v2_header_split_across_writes(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(config("required")) as server:
        header = v2_header(("198.51.100.9", 40000), ("192.0.2.1", 12000))
        pieces = [header[:5], header[5:13], header[13:] + b"he", b"llo"]
        assert await exchange(server.port, *pieces, expect=5) == b"hello"
    assert closed(logs)[0]["peer"] == "198.51.100.9:40000"


async def test_v2_local_uses_the_sockets_own_addresses(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(config("required")) as server:
        header = v2_header(("0.0.0.0", 0), ("0.0.0.0", 0), local=True)
        assert await exchange(server.port, header + b"health", expect=6) == b"health"
    (record,) = closed(logs)
    assert record["peer"].startswith("127.0.0.1:")
    assert "proxy" not in record


async def test_required_without_header_closes_without_echo(logs: list[dict[str, Any]]) -> None:
    metrics = ServerMetrics(CollectorRegistry())
    async with EchoServer(config("required"), metrics=metrics) as server:
        assert await exchange(server.port, b"GET / HTTP/1.0\r\n\r\n", expect=0) == b""
        assert (
            await exchange(server.port, b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\nx", expect=0) == b""
        )
        assert server.stats.connections_rejected == 2
    assert [r["reason"] for r in closed(logs)] == ["proxy_header", "proxy_header"]
    assert all(r["bytes_out"] == 0 for r in closed(logs))
    value = metrics.registry.get_sample_value(
        "echo_connections_rejected_total", {"reason": "proxy_header"}
    )
    assert value == 2


async def test_untrusted_source_is_rejected_in_required_mode(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(config("required", proxy_trusted="10.0.0.0/8")) as server:
        header = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 12000\r\n"
        assert await exchange(server.port, header + b"x", expect=0) == b""
    (record,) = closed(logs)
    assert record["reason"] == "proxy_header"
    assert "untrusted" in record["detail"]


async def test_optional_mode_echoes_plain_clients_and_honours_headers(
    logs: list[dict[str, Any]],
) -> None:
    async with EchoServer(config("optional")) as server:
        assert await exchange(server.port, b"hi", expect=2) == b"hi"
        header = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 12000\r\n"
        assert await exchange(server.port, header + b"six", expect=3) == b"six"
    plain, proxied = closed(logs)
    assert "proxy" not in plain
    assert proxied["peer"] == "[2001:db8::1]:4000"


async def test_optional_mode_from_an_untrusted_source_echoes_the_header_as_payload() -> None:
    async with EchoServer(config("optional", proxy_trusted="10.0.0.0/8")) as server:
        header = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 12000\r\n"
        assert await exchange(server.port, header, expect=len(header)) == header


async def test_header_timeout(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(config("required", proxy_header_timeout=0.2)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing echoed
        writer.close()
    assert closed(logs)[0]["reason"] == "proxy_header"
    async with EchoServer(config("optional", proxy_header_timeout=0.2)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"PROX")  # could still become a header: held until the timeout, then echoed
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"PROX"
        writer.close()


async def test_the_greeting_waits_for_the_proxy_header(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(config("required", greeting="b1")) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        # Server-speaks-first behind a proxy: nothing before the header has arrived.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        writer.write(b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 12000\r\nping")
        assert await asyncio.wait_for(reader.readline(), 5) == b"b1\n"
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        writer.close()


async def test_a_client_rejected_for_its_header_gets_no_byte_at_all() -> None:
    async with EchoServer(config("required", greeting="backend-a")) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_a_rejection_lingers_instead_of_resetting_the_client() -> None:
    # A bad header with data behind it: the server reads and drops the data, sends EOF and
    # closes once the client is done, so the client sees EOF, never ECONNRESET.
    async with EchoServer(config("required")) as server:
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"PROXY TCP9 bad header\r\n" + os.urandom(200_000))
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.write(os.urandom(10_000))  # still sending after the server's EOF
            await writer.drain()
            writer.write_eof()
            await asyncio.sleep(0)
            writer.close()
            await writer.wait_closed()
        assert server.stats.connections_rejected == 10


async def test_rejected_untrusted_connections_get_no_greeting() -> None:
    untrusted = config("required", proxy_trusted="10.0.0.0/8", greeting="hello-{port}")
    async with EchoServer(untrusted) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_per_ip_limit_releases_the_admitted_address_not_the_header_one() -> None:
    async with EchoServer(config("optional", max_connections_per_ip=2)) as server:
        for index in range(5):  # one at a time: never over the limit
            header = f"PROXY TCP4 203.0.113.{index} 192.0.2.1 5000 12000\r\n".encode()
            assert await exchange(server.port, header + b"ok", expect=2) == b"ok"
        assert server.stats.connections_rejected == 0


async def test_eof_while_a_header_might_still_come_is_payload_in_optional_mode(
    logs: list[dict[str, Any]],
) -> None:
    async with EchoServer(config("optional")) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"PRO")  # might be the start of "PROXY ": held...
        writer.write_eof()  # ...until EOF says it was payload
        assert await asyncio.wait_for(reader.read(), 5) == b"PRO"
        writer.close()
    assert closed(logs)[0]["bytes_in"] == 3


async def test_a_connection_rejected_for_its_header_counts_as_rejected_only() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    async with EchoServer(config("required"), metrics=metrics) as server:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"not a header\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        await wait_for(lambda: server.stats.connections_active == 0)
        assert (server.stats.connections_total, server.stats.connections_rejected) == (0, 3)
