"""The pytest plugin: our tests use its fixtures, and so does another project, in a subprocess."""

from __future__ import annotations

import socket

import pytest

from echo_async import EchoServer, ServerConfig, Stats
from echo_async.testing import MISSING_PYTEST_ASYNCIO, TEST_CONFIG, EchoServerFactory
from tests.conftest import echo_once

pytest_plugins = ["pytester"]

# The kind of test file another project writes: no conftest, only the installed entry point.
# `pytestmark` is what strict mode needs; auto mode accepts it too.
EXTERNAL_TESTS = """
import asyncio
import contextlib
from pathlib import Path

import pytest
import pytest_asyncio

from echo_async import ServerConfig

pytestmark = pytest.mark.asyncio
PORTS = Path({ports!r})


async def echo(host, port, payload):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    writer.write_eof()
    try:
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def remember(port):
    with PORTS.open("a") as file:
        file.write(f"{{port}}\\n")


async def test_echo_server_echoes(echo_server):
    remember(echo_server.port)
    assert echo_server.host == "127.0.0.1"
    assert await echo(echo_server.host, echo_server.port, b"hello") == b"hello"
    assert echo_server.stats.bytes_in == echo_server.stats.bytes_out == 5


async def test_factory_takes_a_config(echo_server_factory):
    limited = await echo_server_factory(ServerConfig(host="127.0.0.1", port=0, max_bytes=4))
    plain = await echo_server_factory()
    remember(limited.port)
    remember(plain.port)
    assert plain.port != limited.port
    assert await echo(limited.host, limited.port, b"abcdefgh") == b"abcd"
    assert await echo(plain.host, plain.port, b"abcdefgh") == b"abcdefgh"


# Requested before echo_server, so torn down after it: the client is still open at its teardown.
@pytest_asyncio.fixture
async def clients():
    writers = []
    yield writers
    for writer in writers:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_connection_left_open_does_not_block_teardown(clients, echo_server):
    remember(echo_server.port)
    reader, writer = await asyncio.open_connection(echo_server.host, echo_server.port)
    clients.append(writer)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
"""


def port_is_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_echo_server_is_running_on_loopback_and_a_free_port(echo_server: EchoServer) -> None:
    assert echo_server.host == "127.0.0.1"
    assert echo_server.port > 0
    assert echo_server.is_serving
    assert echo_server.stats == Stats(0, 0, 0, 0)
    assert await echo_once(echo_server.port, b"hello") == b"hello"
    assert echo_server.stats.connections_total == 1
    assert echo_server.stats.bytes_in == echo_server.stats.bytes_out == 5


async def test_factory_starts_each_config_it_is_given(
    echo_server_factory: EchoServerFactory,
) -> None:
    default = await echo_server_factory()
    limited = await echo_server_factory(ServerConfig(host="127.0.0.1", port=0, max_bytes=3))
    assert default.config == TEST_CONFIG
    assert limited.port != default.port
    assert await echo_once(limited.port, b"abcdef") == b"abc"
    assert await echo_once(default.port, b"abcdef") == b"abcdef"


async def test_factory_tolerates_a_server_the_test_closed_itself(
    echo_server_factory: EchoServerFactory,
) -> None:
    server = await echo_server_factory()
    await server.close()
    assert not server.is_serving


async def test_factory_start_errors_reach_the_test(echo_server_factory: EchoServerFactory) -> None:
    taken = await echo_server_factory()
    with pytest.raises(OSError):  # noqa: PT011 - the OS decides which errno
        await echo_server_factory(ServerConfig(host="127.0.0.1", port=taken.port))


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_another_project_uses_the_fixtures(pytester: pytest.Pytester, mode: str) -> None:
    ports = pytester.path / "ports.txt"
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = {mode}
        asyncio_default_fixture_loop_scope = function
        """
    )
    pytester.makepyfile(test_client=EXTERNAL_TESTS.format(ports=str(ports)))
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=3)
    result.stdout.re_match_lines([rf"(?i)asyncio: mode=\S*\b{mode}\b"])
    opened = [int(line) for line in ports.read_text().split()]
    assert len(opened) == 4
    # Teardown closed every server the fixtures started, the one with a client still attached too.
    assert all(port_is_closed(port) for port in opened)


def test_mismatched_loop_scopes_fail_with_a_hint(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = module
        """
    )
    pytester.makepyfile(
        test_client="""
        async def test_factory(echo_server_factory):
            await echo_server_factory()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*set up on another event loop*asyncio_default_fixture_loop_scope*"]
    )


def test_without_pytest_asyncio_only_the_fixtures_fail(pytester: pytest.Pytester) -> None:
    # A module that shadows the installed pytest_asyncio and fails to import, as if it were
    # absent; its own plugin is disabled with -p no:asyncio.
    pytester.makepyfile(pytest_asyncio="raise ImportError('pytest-asyncio is not installed')")
    pytester.makepyfile(
        test_client="""
        def test_unrelated():
            assert True

        def test_wants_a_server(echo_server):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=1, errors=1)
    assert MISSING_PYTEST_ASYNCIO in result.stdout.str()


def test_the_plugin_is_registered_by_the_entry_point(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider", timeout=60)
    result.stdout.fnmatch_lines(["echo_server -- *echo_async*testing.py*"])
    result.stdout.fnmatch_lines(["echo_server_factory -- *echo_async*testing.py*"])
