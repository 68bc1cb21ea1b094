"""Test a network client against a real echo server with the `echo_server` pytest fixtures.

Run it: `python -m pytest examples/test_client_with_fixture.py` in any project that installed
echo-async and pytest-asyncio. The marks make it work in pytest-asyncio's strict mode as well
as in auto mode.
"""

from __future__ import annotations

import asyncio

import pytest

from echo_async import EchoServer, ServerConfig
from echo_async.testing import EchoServerFactory

pytestmark = pytest.mark.asyncio


class LineClient:
    """The client under test: sends a line, returns the line that comes back."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    async def round_trip(self, line: str) -> str:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await reader.readline()).decode().rstrip("\n")
        finally:
            writer.close()
            await writer.wait_closed()


async def test_round_trip(echo_server: EchoServer) -> None:
    client = LineClient(echo_server.host, echo_server.port)
    assert await client.round_trip("hello") == "hello"
    assert echo_server.stats.bytes_in == len("hello\n")


async def test_client_sees_a_short_read(echo_server_factory: EchoServerFactory) -> None:
    # A server that echoes 3 bytes and closes: the client must cope with a truncated line.
    server = await echo_server_factory(ServerConfig(host="127.0.0.1", port=0, max_bytes=3))
    client = LineClient(server.host, server.port)
    assert await client.round_trip("hello") == "hel"


# --8<-- [start:websocket]
async def test_a_websocket_client(echo_server_factory: EchoServerFactory) -> None:
    # A ws:// listener: `addresses` are URLs a WebSocket client can open.
    from websockets.asyncio.client import connect

    server = await echo_server_factory(ServerConfig(listen=["ws://127.0.0.1:0/echo"]))
    async with connect(server.addresses[0]) as websocket:
        await websocket.send("ping")
        assert await websocket.recv() == "ping"  # text comes back as text
        await websocket.send(b"\x00\xff")
        assert await websocket.recv() == b"\x00\xff"  # and binary as binary


# --8<-- [end:websocket]
