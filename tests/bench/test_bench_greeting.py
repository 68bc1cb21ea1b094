"""--greeting: the server's first line is read on every connection and counted per backend.

The servers here are tiny in-test echo servers that send a greeting when a connection opens;
one of them plays a round-robin balancer by greeting with backend-A and backend-B in turn.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trustme

from echo_async.bench import BenchConfig, BenchConfigError, BenchResult, cli, run_bench
from echo_async.bench.greeting import GREETING_LIMIT, GreetingReader
from echo_async.bench.result import merge_backends
from tests.bench.test_bench_cli import JSON_KEYS, parse, pingpong, run

HOST = "127.0.0.1"


class GreetingEcho(asyncio.Protocol):
    """Writes ``greeting`` (one write) when a connection opens, then echoes everything."""

    def __init__(self, greeting: bytes, *, echo: bool = True) -> None:
        self.greeting = greeting
        self.echo = echo

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.greeting:
            self.transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        if self.echo:
            self.transport.write(data)


class ClosingServer(asyncio.Protocol):
    """Hangs up as soon as a connection opens, before any greeting."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


@asynccontextmanager
async def serving(factory: Callable[[], asyncio.BaseProtocol]) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 port 0 in the test's loop; yields its port."""
    server = await asyncio.get_running_loop().create_server(factory, HOST, 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def greeting_server(greeting: bytes = b"backend-A\n") -> Callable[[], GreetingEcho]:
    return lambda: GreetingEcho(greeting)


def balancer(*names: bytes) -> Callable[[], GreetingEcho]:
    """A server that greets each new connection as the next backend, round robin."""
    turns: Iterator[bytes] = itertools.cycle(names)
    return lambda: GreetingEcho(next(turns) + b"\n")


async def bench(port: int, **fields: Any) -> BenchResult:
    fields.setdefault("mode", "pingpong")
    fields.setdefault("size", 1024)
    fields.setdefault("connections", 4)
    if "duration" not in fields:
        fields.setdefault("requests", 400)
    return await run_bench(BenchConfig(port=port, greeting=True, **fields))


def assert_clean(result: BenchResult) -> None:
    assert result.errors == 0, result.error_kinds
    assert result.mismatched_bytes == 0, result.first_mismatch
    assert result.ok, result.problems()


async def test_pingpong_counts_every_connection_per_backend() -> None:
    async with serving(greeting_server()) as port:
        result = await bench(port)
    assert_clean(result)
    assert result.backends == {"backend-A": 4}
    assert result.connections_made == 4
    assert result.round_trips == 400
    assert result.echoed_bytes == 400 * 1024  # the greeting is not echoed data
    assert result.to_json()["backends"] == {"backend-A": 4}


@pytest.mark.parametrize(
    ("mode", "fields"),
    [
        ("stream", {"size": 16384, "duration": 0.3}),
        ("oneshot", {"size": 64, "requests": 50}),
        ("hold", {"size": 64, "connections": 30, "duration": 0.3}),
        ("pingpong", {"pipeline": 4, "requests": 400}),
        ("pingpong", {"rate": 200.0, "duration": 0.3}),
    ],
)
async def test_every_mode_reads_the_greeting_first(mode: str, fields: dict[str, Any]) -> None:
    async with serving(greeting_server()) as port:
        result = await bench(port, mode=mode, **fields)
    assert_clean(result)
    assert result.round_trips > 0
    assert result.backends == {"backend-A": result.connections_made}


async def test_a_balancer_spreading_connections_shows_in_backends() -> None:
    async with serving(balancer(b"backend-A", b"backend-B", b"backend-C")) as port:
        result = await bench(port, mode="oneshot", size=64, requests=60)
    assert_clean(result)
    assert result.backends == {"backend-A": 20, "backend-B": 20, "backend-C": 20}


async def test_two_processes_merge_backends_exactly() -> None:
    async with serving(balancer(b"backend-A", b"backend-B")) as port:
        result = await bench(port, mode="oneshot", size=64, requests=41, processes=2)
    assert_clean(result)
    assert result.connections_made == 41
    assert result.backends == {"backend-A": 21, "backend-B": 20}


def test_merging_adds_counts_and_puts_the_busiest_backend_first() -> None:
    merged = merge_backends([{"a": 2, "b": 1}, {}, {"c": 1, "b": 3}])
    assert merged == {"b": 4, "a": 2, "c": 1}
    assert list(merged) == ["b", "a", "c"]
    assert list(merge_backends([{"y": 1, "x": 1}])) == ["x", "y"]  # ties: by line


async def test_a_greeting_split_over_two_reads_is_reassembled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server sends b"back"; only once the client has read it does it send b"end-A\n", so
    # the two pieces are certainly two reads.
    servers: list[GreetingEcho] = []
    chunks: list[bytes] = []
    read = GreetingReader.data_received

    def recording(self: GreetingReader, data: bytes) -> None:
        chunks.append(data)
        read(self, data)
        if data == b"back":
            servers[0].transport.write(b"end-A\n")

    def server() -> GreetingEcho:
        servers.append(GreetingEcho(b"back"))
        return servers[-1]

    monkeypatch.setattr(GreetingReader, "data_received", recording)
    async with serving(server) as port:
        result = await bench(port, connections=1, requests=50)
    assert chunks == [b"back", b"end-A\n"]
    assert_clean(result)
    assert result.backends == {"backend-A": 1}
    assert result.round_trips == 50


async def test_bytes_after_the_greeting_are_counted_exactly_as_never_sent() -> None:
    # They arrive before the client sends anything; the echoes after them still check clean.
    async with serving(greeting_server(b"backend-A\nXY")) as port:
        result = await bench(port, connections=3, requests=300)
    assert result.mismatched_bytes == 3 * 2
    assert result.first_mismatch is not None
    assert "2 bytes after the greeting line" in result.first_mismatch
    assert result.round_trips == 300
    assert result.echoed_bytes == 300 * 1024
    assert result.errors == 0
    assert result.backends == {"backend-A": 3}
    assert not result.ok


@pytest.mark.parametrize(
    ("greeting", "line"),
    [
        (b"backend-A\r\n", "backend-A"),
        (b"caf\xe9\n", "caf\ufffd"),
        (b"\n", ""),
        (b"x" * (GREETING_LIMIT - 1) + b"\n", "x" * (GREETING_LIMIT - 1)),
    ],
)
async def test_greeting_lines_are_decoded(greeting: bytes, line: str) -> None:
    async with serving(greeting_server(greeting)) as port:
        result = await bench(port, connections=2, requests=20)
    assert_clean(result)
    assert result.backends == {line: 2}


@pytest.mark.parametrize(
    ("factory", "error"),
    [
        (lambda: GreetingEcho(b""), "greeting: no line within 0.3s"),
        (lambda: GreetingEcho(b"backend-A"), "greeting: no line within 0.3s"),
        (lambda: GreetingEcho(b"x" * GREETING_LIMIT + b"\n"), "no newline in the first 1024"),
        (ClosingServer, "greeting: connection closed before the greeting line"),
    ],
    ids=["no greeting", "no newline", "too long", "closed"],
)
async def test_a_missing_or_bad_greeting_is_an_error(
    factory: Callable[[], asyncio.BaseProtocol], error: str
) -> None:
    async with serving(factory) as port:
        result = await bench(port, connections=3, timeout=0.3, max_errors=2, duration=5)
    assert not result.ok
    assert result.duration_s < 2  # ended by the third error, not by --duration
    assert result.round_trips == result.connections_made == 0
    assert result.backends == {}
    assert any(error in kind for kind in result.error_kinds), result.error_kinds


async def test_a_unix_socket_server_greets_too(tmp_path: Path) -> None:
    path = str(tmp_path / "greeting.sock")
    server = await asyncio.get_running_loop().create_unix_server(greeting_server(), path)
    async with server:
        result = await run_bench(
            BenchConfig(
                mode="pingpong", unix_path=path, greeting=True, connections=2, size=64, requests=50
            )
        )
    assert_clean(result)
    assert result.backends == {"backend-A": 2}


async def test_a_tls_server_greets_too(certificate_authority: trustme.CA) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert(HOST).configure_cert(context)
    server = await asyncio.get_running_loop().create_server(greeting_server(), HOST, 0, ssl=context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        result = await bench(port, tls=True, mode="oneshot", size=64, requests=10)
    assert_clean(result)
    assert result.backends == {"backend-A": 10}


def test_greeting_with_udp_is_a_config_error() -> None:
    with pytest.raises(BenchConfigError, match="--udp and --greeting"):
        BenchConfig(mode="pingpong", connections=1, size=64, duration=1, port=7, udp=True,
                    greeting=True)  # fmt: skip


async def test_the_json_has_backends_only_with_greeting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with_greeting = tmp_path / "with.json"
    without = tmp_path / "without.json"
    async with serving(balancer(b"[red]backend-A", b"backend-B")) as port:
        assert await run(pingpong(port, "--greeting", "--json", str(with_greeting))) == 0
        table = capsys.readouterr().out
        # Without --greeting the greeting is echo data to the bench: it fails, as it should.
        assert await run(pingpong(port, "--json", str(without), "--quiet")) == 1
    result = json.loads(with_greeting.read_text())
    assert set(result) == JSON_KEYS | {"backends"}
    assert result["backends"] == {"[red]backend-A": 1, "backend-B": 1}
    assert set(json.loads(without.read_text())) == JSON_KEYS
    assert "backends" in table
    assert "[red]backend-A: 1 (50.0%)" in table  # shown as sent, not read as markup
    assert "backend-B: 1 (50.0%)" in table


async def test_the_command_fails_when_the_server_sends_no_greeting(
    echo_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run (0.3 s) ends long before --timeout (10 s): no greeting error is ever counted.
    assert await run(pingpong(echo_port, "--greeting", "--quiet")) == 1
    assert "no connection received a greeting line" in capsys.readouterr().err


def test_udp_with_greeting_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--port", "7", "--udp", "--greeting", "--mode", "pingpong", "--connections", "1",
            "--size", "64", "--duration", "1"]  # fmt: skip
    assert cli.run(parse(argv)) == 2
    assert capsys.readouterr().err == (
        "echo-async bench: error: --udp and --greeting cannot be combined\n"
    )
