"""Shared fixtures: every async test runs on both event loops (asyncio's and uvloop)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
from hypothesis import settings
from structlog.testing import capture_logs

from echo_async import EchoServer, ServerConfig

LoopFactory = Any

# The same examples on every run (CI included): a property test that fails, fails again.
# HYPOTHESIS_PROFILE=explore runs fresh random examples instead.
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    factories: dict[str, Any] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories


class Records(logging.Handler):
    """A handler keeping every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog record emitted during the test, as dicts."""
    with capture_logs() as captured:
        yield captured
    structlog.reset_defaults()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Contexts passed to the running loop's exception handler (each one is a swallowed error)."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)


@pytest.fixture
async def server(logs: list[dict[str, Any]]) -> AsyncIterator[EchoServer]:
    """A running EchoServer on 127.0.0.1 and a free port, closed after the test."""
    async with EchoServer(ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=2)) as running:
        yield running


async def echo_once(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send `payload`, half-close, and return everything the server sent back until EOF."""
    reader, writer = await asyncio.open_connection(host, port)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    try:
        # Read while writing: a client that writes everything first deadlocks against any
        # server that applies backpressure, as ours does.
        _, echoed = await asyncio.gather(send(), reader.read())
        return echoed
    finally:
        writer.close()
        await writer.wait_closed()


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.005) -> None:
    """Poll `predicate()` until it is true; fail the test at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(certificate_authority: trustme.CA, tmp_path: Path) -> dict[str, str]:
    server_cert = certificate_authority.issue_cert("127.0.0.1", "localhost", "::1")
    cert = tmp_path / "server.pem"
    key = tmp_path / "server.key"
    ca = tmp_path / "ca.pem"
    server_cert.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    certificate_authority.cert_pem.write_to_path(str(ca))
    return {"tls_cert": str(cert), "tls_key": str(key), "ca": str(ca)}
