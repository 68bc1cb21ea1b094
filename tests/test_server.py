"""EchoServer's lifecycle: stats, close records, graceful close, resets, what it leaves alone."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from typing import Any

import pytest
import structlog

from echo_async import EchoServer, ServerConfig, Stats
from tests.conftest import echo_once, wait_for

CLOSE_FIELDS = {"peer", "local", "bytes_in", "bytes_out", "duration_s", "reason"}


def closed_records(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in logs if record["event"] == "connection closed"]


async def test_port_zero_binds_a_free_port_and_reports_it() -> None:
    async with EchoServer(ServerConfig(host="127.0.0.1", port=0)) as server:
        assert server.port > 0
        assert server.host == "127.0.0.1"
        assert server.addresses == [f"tcp://127.0.0.1:{server.port}"]
        assert server.stats == Stats(0, 0, 0, 0)


async def test_stats_and_close_record_count_every_byte(
    server: EchoServer, logs: list[dict[str, Any]]
) -> None:
    payloads = [os.urandom(size) for size in (10, 70_000, 1)]
    for payload in payloads:
        assert await echo_once(server.port, payload) == payload
    await wait_for(lambda: len(closed_records(logs)) == 3)
    stats = server.stats
    assert stats.connections_total == 3
    assert stats.connections_active == 0
    assert stats.bytes_in == stats.bytes_out == sum(map(len, payloads))
    for record, payload in zip(closed_records(logs), payloads, strict=True):
        assert set(record) >= CLOSE_FIELDS
        assert record["log_level"] == "info"
        assert record["reason"] == "eof"
        assert record["bytes_in"] == record["bytes_out"] == len(payload)
        assert record["peer"].startswith("127.0.0.1:")
        assert record["local"] == f"127.0.0.1:{server.port}"
        assert record["duration_s"] >= 0


async def test_payload_never_reaches_the_logs(
    server: EchoServer, logs: list[dict[str, Any]]
) -> None:
    marker = b"SECRET-PAYLOAD-MARKER"
    assert await echo_once(server.port, marker) == marker
    await wait_for(lambda: len(closed_records(logs)) == 1)
    assert "SECRET-PAYLOAD-MARKER" not in repr(logs)


async def test_open_event_at_debug_level(server: EchoServer, logs: list[dict[str, Any]]) -> None:
    await echo_once(server.port, b"x")
    await wait_for(lambda: len(closed_records(logs)) == 1)
    opened = [record for record in logs if record["event"] == "connection opened"]
    assert len(opened) == 1
    assert opened[0]["log_level"] == "debug"


async def test_live_stats_count_open_connections(server: EchoServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"a" * 1000)
    assert await reader.readexactly(1000) == b"a" * 1000
    stats = server.stats
    assert (stats.connections_active, stats.bytes_in, stats.bytes_out) == (1, 1000, 1000)
    writer.close()
    await writer.wait_closed()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_clients_resetting_mid_stream_leave_no_error_or_task(
    server: EchoServer,
    logs: list[dict[str, Any]],
    loop_errors: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks_before = asyncio.all_tasks()
    clients = 20
    for _ in range(clients):
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        # Keep the server busy writing to a client that is not reading, then reset.
        writer.write(os.urandom(2 * 1024 * 1024))
        await wait_for(lambda: server.stats.bytes_in > 0)
        reset(writer)
    await wait_for(lambda: len(closed_records(logs)) == clients)
    assert {record["reason"] for record in closed_records(logs)} == {"reset"}
    assert not [record for record in logs if record["log_level"] in ("error", "critical")]
    assert not loop_errors
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert asyncio.all_tasks() <= tasks_before
    # The server still serves.
    assert await echo_once(server.port, b"still here") == b"still here"


async def test_close_drains_in_flight_echo_then_sends_eof(logs: list[dict[str, Any]]) -> None:
    server = EchoServer(ServerConfig(host="127.0.0.1", port=0))
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"before shutdown")
    assert await reader.readexactly(15) == b"before shutdown"
    await server.close(timeout=5)
    assert await reader.read() == b""  # clean EOF, no reset
    assert not server.is_serving
    (record,) = closed_records(logs)
    assert record["reason"] == "shutdown"
    assert record["bytes_out"] == 15
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", server.port)
    writer.close()


async def test_close_aborts_clients_that_stop_reading_at_the_deadline(
    logs: list[dict[str, Any]],
) -> None:
    server = EchoServer(ServerConfig(host="127.0.0.1", port=0))
    await server.start()
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.transport.set_write_buffer_limits(high=64 * 1024 * 1024)
    writer.write(os.urandom(32 * 1024 * 1024))  # never read: the server's writes back up
    await wait_for(lambda: server.stats.bytes_in > 1024 * 1024)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.close(timeout=0.3)
    assert loop.time() - started < 5
    (record,) = closed_records(logs)
    assert record["reason"] == "shutdown"
    # What was still queued when the deadline hit was not sent, and is not counted as sent.
    assert record["bytes_out"] < record["bytes_in"]
    summary = [r for r in logs if r["event"] == "server closed"]
    assert summary[0]["aborted_at_shutdown"] == 1
    writer.transport.abort()


async def test_close_is_idempotent_and_serve_forever_returns(server: EchoServer) -> None:
    forever = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0)
    assert not forever.done()
    await server.close()
    await server.close()
    await asyncio.wait_for(forever, 5)


async def test_embedding_changes_no_process_wide_state() -> None:
    policy = asyncio.get_event_loop_policy()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    structlog_config = structlog.get_config()
    loop = asyncio.get_running_loop()
    async with EchoServer(ServerConfig(host="127.0.0.1", port=0)) as server:
        await echo_once(server.port, b"hi")
    assert asyncio.get_event_loop_policy() is policy
    assert handlers == {signum: signal.getsignal(signum) for signum in handlers}
    assert structlog.get_config() == structlog_config
    assert asyncio.get_running_loop() is loop


async def test_starting_twice_is_an_error(server: EchoServer) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        await server.start()


async def test_busy_port_raises_oserror_and_leaves_nothing_listening(server: EchoServer) -> None:
    other = EchoServer(ServerConfig(host="127.0.0.1", port=server.port))
    with pytest.raises(OSError, match="address already in use"):
        await other.start()
    assert other.addresses == []


async def test_handlers_streams_are_freed_without_closing_the_connection() -> None:
    import gc
    import weakref

    from echo_async.connection import EchoConnection

    writers: list[weakref.ref[Any]] = []
    original = EchoConnection.__init__

    def spy(self: EchoConnection, owner: Any, transport: Any, writer: Any, *rest: Any) -> None:
        writers.append(weakref.ref(writer))
        original(self, owner, transport, writer, *rest)

    EchoConnection.__init__ = spy  # type: ignore[method-assign]
    try:
        async with EchoServer(ServerConfig(host="127.0.0.1", port=0)) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await wait_for(lambda: len(writers) == 1)
            gc.collect()
            assert writers[0]() is None  # the StreamWriter (and its reader) are gone...
            writer.write(b"still open")  # ...and the connection lives on
            assert await reader.readexactly(10) == b"still open"
            writer.close()
    finally:
        EchoConnection.__init__ = original  # type: ignore[method-assign]


async def test_a_connection_accepted_while_closing_is_not_left_behind() -> None:
    for turns in range(4):
        server = EchoServer(ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=1))
        await server.start()
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", server.port))
        for _ in range(turns):
            await asyncio.sleep(0)
        await server.close()
        for _ in range(10):  # let any late connection_made run
            await asyncio.sleep(0)
        assert not server._state.connections
        client.close()


async def test_a_unix_only_server_has_no_port(tmp_path: Any) -> None:
    path = f"{tmp_path}/only.sock"
    async with EchoServer(ServerConfig(listen=(f"unix://{path}",))) as server:
        with pytest.raises(RuntimeError, match="no IP listener"):
            _ = server.port
