"""Servers for the bench tests: echo-async's own, and small misbehaving ones written here.

All listen on 127.0.0.1 (or a Unix socket in tmp_path) on port 0, inside the test's loop.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import trustme

from echo_async import EchoServer, ServerConfig

HOST = "127.0.0.1"


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """The port of an echo-async EchoServer on 127.0.0.1."""
    async with EchoServer(ServerConfig(host=HOST, port=0)) as server:
        yield server.port


class Echo(asyncio.Protocol):
    """A plain echo protocol; ``flip_at`` corrupts the byte at that stream offset."""

    def __init__(self, flip_at: int | None = None, *, echo: bool = True) -> None:
        self.flip_at = flip_at
        self.echo = echo
        self.offset = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        start, self.offset = self.offset, self.offset + len(data)
        if not self.echo:
            return
        if self.flip_at is not None and start <= self.flip_at < self.offset:
            corrupted = bytearray(data)
            corrupted[self.flip_at - start] ^= 0xFF
            data = bytes(corrupted)
        self.transport.write(data)


async def _serve_tcp(factory: type[Echo] | object) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, HOST, 0)  # type: ignore[arg-type]


@pytest.fixture
async def corrupting_port() -> AsyncIterator[int]:
    """A server that echoes everything but flips byte 5 of every connection's stream."""
    server = await _serve_tcp(lambda: Echo(flip_at=5))
    async with server:
        yield server.sockets[0].getsockname()[1]


class Greeter(Echo):
    """A plaintext echo protocol that speaks first: one line as the connection opens."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.write(b"hello from a plaintext server\r\n")


@pytest.fixture(params=["echo", "greeting"])
async def plaintext_port(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    """A plain asyncio echo server, no TLS: one that only echoes (a TLS client gets its own
    ClientHello back), and one that sends a line first.
    """
    server = await _serve_tcp(Greeter if request.param == "greeting" else Echo)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A server that accepts connections and reads, but never echoes."""
    server = await _serve_tcp(lambda: Echo(echo=False))
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.fixture
async def unix_path(tmp_path: Path) -> AsyncIterator[str]:
    """A Unix-socket echo server's path."""
    path = str(tmp_path / "echo.sock")
    server = await asyncio.get_running_loop().create_unix_server(Echo, path)
    async with server:
        yield path


class DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.transport.sendto(data, addr)


@pytest.fixture
async def udp_port() -> AsyncIterator[int]:
    """A UDP echo server's port."""
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        DatagramEcho, local_addr=(HOST, 0)
    )
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


@pytest.fixture(scope="session")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(certificate_authority: trustme.CA, tmp_path: Path) -> str:
    """The test CA's certificate as a PEM file, for --tls-ca."""
    path = tmp_path / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def tls_port(certificate_authority: trustme.CA) -> AsyncIterator[int]:
    """A TLS echo server's port, with a certificate for 127.0.0.1 from the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert(HOST).configure_cert(context)
    server = await asyncio.get_running_loop().create_server(Echo, HOST, 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]
