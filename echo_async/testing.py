"""The pytest plugin: `echo_server` and `echo_server_factory`, real echo servers for your tests.

Installing echo-async registers this module through the `pytest11` entry point, so any project's
tests can ask for the fixtures by name:

    async def test_client_round_trip(echo_server):
        reader, writer = await asyncio.open_connection(echo_server.host, echo_server.port)

Both fixtures are async and need pytest-asyncio (strict or auto mode). They run on the loop
pytest-asyncio gives async fixtures (`asyncio_default_fixture_loop_scope`, the fixture's own
function scope when unset), which must be the loop your tests run on, as for any async fixture.

pytest-asyncio is imported when present, never required: a project that has echo-async installed
but no pytest-asyncio still runs pytest normally; only a test that asks for these fixtures fails,
with one line saying what to install.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, ParamSpec, Protocol, TypeVar

import pytest

from echo_async.config import ServerConfig
from echo_async.server import EchoServer

__all__ = [
    "CLOSE_TIMEOUT_S",
    "TEST_CONFIG",
    "EchoServerFactory",
    "echo_server",
    "echo_server_factory",
]

# Seconds a server's open connections get to finish when the test is over; then they are aborted.
CLOSE_TIMEOUT_S = 1.0
# What the factory starts when given no config: loopback, a free port, short drains.
TEST_CONFIG = ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=CLOSE_TIMEOUT_S)
MISSING_PYTEST_ASYNCIO = (
    "the echo_server fixtures are async fixtures and need pytest-asyncio: "
    "pip install pytest-asyncio"
)

_Parameters = ParamSpec("_Parameters")
_Result = TypeVar("_Result", bound=Awaitable[Any] | AsyncIterator[Any])


class EchoServerFactory(Protocol):
    """What `echo_server_factory` yields: start a server, get it back running."""

    async def __call__(self, config: ServerConfig | None = None) -> EchoServer:
        """Start an `EchoServer` on `config` (default `TEST_CONFIG`); closed after the test."""
        ...


def _asyncio_fixture(
    function: Callable[_Parameters, _Result],
) -> Callable[_Parameters, _Result]:
    """`pytest_asyncio.fixture(function)`, or a fixture that fails saying pytest-asyncio is missing.

    `pytest_asyncio.fixture` (not `pytest.fixture`) so the fixture also runs in strict mode.
    """
    try:
        # Optional, so type checkers may not have it either: then the annotation below holds.
        import pytest_asyncio  # type: ignore[import-not-found, unused-ignore]
    except ImportError:

        def needs_pytest_asyncio() -> NoReturn:
            pytest.fail(MISSING_PYTEST_ASYNCIO, pytrace=False)

        # A plain function, so pytest calls it and shows the message instead of refusing an
        # async fixture that no plugin handles.
        needs_pytest_asyncio.__doc__ = function.__doc__
        return pytest.fixture(needs_pytest_asyncio, name=function.__name__)
    asyncio_fixture: Callable[[Callable[_Parameters, _Result]], Callable[_Parameters, _Result]] = (
        pytest_asyncio.fixture
    )
    return asyncio_fixture(function)


@_asyncio_fixture
async def echo_server_factory() -> AsyncIterator[EchoServerFactory]:
    """Starts echo servers on demand; every one is closed after the test.

    `await echo_server_factory()` starts one on `TEST_CONFIG` (127.0.0.1, a free port);
    `await echo_server_factory(ServerConfig(host="127.0.0.1", port=0, max_bytes=4))` starts one
    on your own config (give it `port=0` unless you want a fixed port). At teardown open
    connections get `CLOSE_TIMEOUT_S` seconds to finish, then are aborted.
    """
    loop = asyncio.get_running_loop()
    servers: list[EchoServer] = []

    async def factory(config: ServerConfig | None = None) -> EchoServer:
        if asyncio.get_running_loop() is not loop:
            raise RuntimeError(
                "echo_server_factory was set up on another event loop than the one calling it; "
                "make asyncio_default_fixture_loop_scope match your tests' loop scope"
            )
        server = EchoServer(config if config is not None else TEST_CONFIG)
        await server.start()
        servers.append(server)
        return server

    yield factory
    results = await asyncio.gather(
        *(server.close(timeout=CLOSE_TIMEOUT_S) for server in servers), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result


@_asyncio_fixture
async def echo_server(echo_server_factory: EchoServerFactory) -> EchoServer:
    """A running `EchoServer` on 127.0.0.1 and a free port: `.host`, `.port`, `.stats`."""
    return await echo_server_factory()
