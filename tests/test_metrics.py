"""Metrics match the traffic; /metrics and /healthz answer; hostile clients don't stall them."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
from prometheus_client import CollectorRegistry

from echo_async import EchoServer, ServerConfig
from echo_async.metrics import MetricsEndpoint, ServerMetrics
from tests.conftest import echo_once, wait_for

TCP = {"transport": "tcp"}


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_metric_values_match_the_traffic() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    payloads = [os.urandom(size) for size in (1, 1000, 70_000, 5)]
    sample = metrics.registry.get_sample_value
    async with EchoServer(ServerConfig(host="127.0.0.1", port=0), metrics=metrics) as server:
        for payload in payloads:
            assert await echo_once(server.port, payload) == payload
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"open")
        assert await reader.readexactly(4) == b"open"
        # Synced from the server's own counters at most a second later.
        await wait_for(lambda: sample("echo_connections_active", TCP) == 1, 5)
        writer.close()
    total_bytes = sum(map(len, payloads)) + 4
    assert sample("echo_connections_total", TCP) == len(payloads) + 1
    assert sample("echo_connections_active", TCP) == 0
    assert sample("echo_bytes_received_total", TCP) == total_bytes
    assert sample("echo_bytes_sent_total", TCP) == total_bytes
    assert sample("echo_connection_duration_seconds_count", TCP) == len(payloads) + 1


async def test_endpoint_serves_metrics_and_health() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    healthy = True
    endpoint = MetricsEndpoint("127.0.0.1", 0, metrics.registry, lambda: healthy)
    await endpoint.start()
    try:
        status, body = await http_get(endpoint.port, "/metrics")
        assert status == 200
        assert b"echo_connections_active" in body
        assert b"# TYPE echo_connection_duration_seconds histogram" in body
        assert await http_get(endpoint.port, "/healthz") == (200, b"ok\n")
        healthy = False
        assert await http_get(endpoint.port, "/healthz") == (503, b"draining\n")
        assert (await http_get(endpoint.port, "/nope"))[0] == 404
        assert (await http_get(endpoint.port, "/metrics", "POST"))[0] == 405
        assert (await http_get(endpoint.port, "/healthz", "HEAD"))[1] == b""
    finally:
        await endpoint.close()


async def test_hostile_clients_do_not_stall_the_endpoint() -> None:
    endpoint = MetricsEndpoint("127.0.0.1", 0, CollectorRegistry(), lambda: True)
    await endpoint.start()
    try:
        silent = await asyncio.open_connection("127.0.0.1", endpoint.port)  # never sends
        flood = await asyncio.open_connection("127.0.0.1", endpoint.port)
        flood[1].write(b"G" * 100_000)  # a request line far over the limit
        assert await http_get(endpoint.port, "/healthz") == (200, b"ok\n")
        assert await asyncio.wait_for(flood[0].read(), 5) == b""  # dropped
        silent[1].close()
        flood[1].close()
    finally:
        await endpoint.close()  # must not hang on the silent client


async def test_a_request_with_endless_headers_is_cut_off() -> None:
    endpoint = MetricsEndpoint("127.0.0.1", 0, CollectorRegistry(), lambda: True)
    await endpoint.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        header = b"X-Padding: " + b"a" * 100 + b"\r\n"
        try:
            for _ in range(2000):  # 220 KB of headers and never the blank line
                writer.write(header)
            await writer.drain()
        except ConnectionError:
            pass  # the server may close while we are still sending: that is the point
        response = b""
        with contextlib.suppress(ConnectionError):
            response = await asyncio.wait_for(reader.read(), 4)
        assert response.startswith(b"HTTP/1.1 431 ")
        writer.close()
    finally:
        await endpoint.close()


class CountingMetrics(ServerMetrics):
    syncs = 0

    def sync(self, *args: object, **kwargs: object) -> None:
        self.syncs += 1


async def test_metrics_sync_every_second_even_when_the_timer_fires_early(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import echo_async.server

    clock = [1000.0]
    monkeypatch.setattr(echo_async.server.time, "monotonic", lambda: clock[0])
    metrics = CountingMetrics(CollectorRegistry())
    server = EchoServer(ServerConfig(host="127.0.0.1", port=0), metrics=metrics)
    server._tick()
    # The next ticks fire a millisecond early by time.monotonic() (uvloop's clock does that).
    for second in range(1, 4):
        clock[0] = 1000.0 + second - 0.001
        server._tick()
    assert metrics.syncs == 4
