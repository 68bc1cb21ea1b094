"""Flow control: a client that stops reading makes the server stop reading from it."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from echo_async import EchoServer, ServerConfig
from tests.conftest import echo_once
from tests.e2e.helpers import start_cli_server, stop_cli_server

MiB = 1024 * 1024


async def test_server_stops_reading_from_a_client_that_does_not_read() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=0.5)
    async with EchoServer(config) as server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.transport.set_write_buffer_limits(high=64 * MiB)
        writer.write(os.urandom(64 * MiB))  # and never read
        # Wait until the server's intake stops growing: it has paused reading.
        previous = -1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while server.stats.bytes_in != previous:
            previous = server.stats.bytes_in
            await asyncio.sleep(0.2)
            assert loop.time() < deadline, "the server never stopped reading"
        stats = server.stats
        queued = stats.bytes_in - stats.bytes_out
        assert stats.bytes_in < 64 * MiB
        # Queued in the server: at most the high-water mark plus one read.
        assert queued <= config.write_buffer_high + 1 * MiB
        # Other clients are still served.
        assert await echo_once(server.port, b"other client") == b"other client"
        writer.transport.abort()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read RSS")
def test_memory_stays_bounded_when_a_client_sends_64_mib_without_reading(tmp_path: Path) -> None:
    process, port = start_cli_server(["--shutdown-timeout", "1"], tmp_path)
    try:
        baseline = rss_bytes(process.pid)
        hog = socket.create_connection(("127.0.0.1", port))
        hog.setblocking(False)
        chunk = os.urandom(MiB)
        sent = 0
        stalled_since = time.monotonic()
        # Push up to 64 MiB; stop once the server has accepted nothing for a full second.
        while sent < 64 * MiB and time.monotonic() - stalled_since < 1.0:
            try:
                sent += hog.send(chunk)
                stalled_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        growth = rss_bytes(process.pid) - baseline
        assert sent < 64 * MiB, "the server read 64 MiB from a client that never read"
        assert growth < 32 * MiB, f"server RSS grew by {growth / MiB:.1f} MiB"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
            other.sendall(b"still served")
            assert other.recv(100) == b"still served"
        hog.close()
    finally:
        stop_cli_server(process)
