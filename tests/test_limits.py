"""Limits: caps reject with a counted, logged reason; timers close; others are undisturbed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

from prometheus_client import CollectorRegistry

from echo_async import EchoServer, ServerConfig
from echo_async.limits import sweep_interval
from echo_async.metrics import ServerMetrics
from tests.conftest import echo_once, wait_for


def records(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [record for record in logs if record["event"] == event]


async def connect(port: int, source: str = "127.0.0.1") -> tuple[Any, Any]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def assert_echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    payload = os.urandom(100)
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(100), 5) == payload


async def assert_closed_without_echo(reader: asyncio.StreamReader, writer: Any) -> None:
    writer.write(b"anyone there?")
    # Closed with our bytes unread: a reset is as good as a FIN here.
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_max_connections_rejects_the_extra_one_and_serves_the_rest(
    logs: list[dict[str, Any]],
) -> None:
    metrics = ServerMetrics(CollectorRegistry())
    config = ServerConfig(host="127.0.0.1", port=0, max_connections=3)
    async with EchoServer(config, metrics=metrics) as server:
        served = [await connect(server.port) for _ in range(3)]
        for reader, writer in served:
            await assert_echoes(reader, writer)
        await assert_closed_without_echo(*await connect(server.port))
        for reader, writer in served:
            await assert_echoes(reader, writer)
        assert server.stats.connections_rejected == 1
        assert server.stats.connections_active == 3
        for _, writer in served:
            writer.close()
    (rejected,) = records(logs, "connection rejected")
    assert (rejected["reason"], rejected["limit"]) == ("limit", "max_connections")
    value = metrics.registry.get_sample_value(
        "echo_connections_rejected_total", {"reason": "max_connections"}
    )
    assert value == 1


async def test_max_connections_per_ip_counts_each_address(logs: list[dict[str, Any]]) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, max_connections_per_ip=2)
    async with EchoServer(config) as server:
        first = [await connect(server.port, "127.0.0.1") for _ in range(2)]
        await assert_closed_without_echo(*await connect(server.port, "127.0.0.1"))
        other = await connect(server.port, "127.0.0.2")  # another address has its own quota
        await assert_echoes(*other)
        for reader, writer in first:
            await assert_echoes(reader, writer)
        first[0][1].close()
        await wait_for(lambda: server.stats.connections_active == 2)
        await assert_echoes(*await connect(server.port, "127.0.0.1"))  # a slot freed up
    (rejected,) = records(logs, "connection rejected")
    assert rejected["limit"] == "max_connections_per_ip"
    assert rejected["peer"].startswith("127.0.0.1:")


async def test_idle_timeout_closes_silent_clients_only(logs: list[dict[str, Any]]) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, idle_timeout=0.4)
    async with EchoServer(config) as server:
        silent_reader, silent_writer = await connect(server.port)
        await assert_echoes(silent_reader, silent_writer)
        busy_reader, busy_writer = await connect(server.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < 1.2:  # three idle periods, talking all the while
            await assert_echoes(busy_reader, busy_writer)
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(silent_reader.read(), 5) == b""  # clean EOF
        await assert_echoes(busy_reader, busy_writer)
        busy_writer.close()
        silent_writer.close()
    reasons = {r["reason"] for r in records(logs, "connection closed")}
    assert "idle_timeout" in reasons


async def test_max_lifetime_ends_even_a_busy_connection_cleanly(
    logs: list[dict[str, Any]],
) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, max_lifetime=0.3)
    async with EchoServer(config) as server:
        reader, writer = await connect(server.port)
        sent = bytearray()
        received = bytearray()

        async def keep_sending() -> None:
            while not writer.is_closing():
                chunk = os.urandom(512)
                sent.extend(chunk)
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.01)

        sender = asyncio.ensure_future(keep_sending())
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received.extend(chunk)
        writer.close()
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        # What came back is exactly a prefix of what was sent, then EOF.
        assert len(received) > 0
        assert bytes(received) == bytes(sent[: len(received)])
    (record,) = records(logs, "connection closed")
    assert record["reason"] == "max_lifetime"
    assert record["duration_s"] >= 0.3


async def test_max_bytes_echoes_exactly_the_budget_then_closes(logs: list[dict[str, Any]]) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, max_bytes=1000)
    async with EchoServer(config) as server:
        payload = os.urandom(3000)
        assert await echo_once(server.port, payload) == payload[:1000]
    (record,) = records(logs, "connection closed")
    assert record["reason"] == "max_bytes"
    assert record["bytes_out"] == 1000


async def test_idle_connections_need_no_task_or_timer_each() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, idle_timeout=60, max_lifetime=60)
    async with EchoServer(config) as server:
        tasks_before = len(asyncio.all_tasks())
        clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
        await wait_for(lambda: server.stats.connections_active == 300)
        # asyncio's own accept path runs a short task per accept; none may stay behind.
        await wait_for(lambda: len(asyncio.all_tasks()) == tasks_before)
        loop: Any = asyncio.get_running_loop()
        scheduled = getattr(loop, "_scheduled", None)  # asyncio's timer heap; uvloop hides it
        if scheduled is not None:
            assert len(scheduled) < 10
        for client in clients:
            client.close()
        await wait_for(lambda: server.stats.connections_active == 0)


def test_sweep_interval_follows_the_shortest_timer() -> None:
    assert sweep_interval(ServerConfig(idle_timeout=0, max_lifetime=0)) == 1.0
    assert sweep_interval(ServerConfig(idle_timeout=2, max_lifetime=0)) == 0.5
    assert sweep_interval(ServerConfig(idle_timeout=300, max_lifetime=0.1)) == 0.05


class StubTransport:
    """Just enough of a transport to drive EchoConnection.sweep() by hand."""

    def __init__(self) -> None:
        self.buffered = 0
        self.aborted = False
        self.closing = False

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 12000)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.aborted = True
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def test_idle_timeout_spares_a_client_that_is_still_reading_slowly() -> None:
    from echo_async.connection import EchoConnection

    transport = StubTransport()
    connection = EchoConnection(None, transport, None, ("127.0.0.1", 1))  # type: ignore[arg-type]
    start = connection.opened_at
    transport.buffered = 900_000  # a big reply queued; the client sends nothing more
    for second in range(1, 6):
        transport.buffered -= 100_000  # ...but it keeps reading, slowly
        connection.sweep(start + second, idle_timeout=2.0, max_lifetime=0.0)
    assert not transport.aborted
    for second in range(6, 9):  # now it stops reading: that is idle
        connection.sweep(start + second, idle_timeout=2.0, max_lifetime=0.0)
    assert transport.aborted
    assert connection.close_reason == "idle_timeout"
