"""--url ws:// and wss://: the bench against websockets' own echo server, echo-async's ws://
listener, and servers written here that break the echo or the close handshake on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trustme
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import BINARY, CLOSE, Close, Frame
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.typing import Data

from echo_async import EchoServer, ServerConfig
from echo_async.bench import BenchConfig, BenchResult, cli, run_bench
from echo_async.bench.websocket import CLOSE_TIMEOUT_S

HOST = "127.0.0.1"
SHORT = 0.4
Handler = Callable[[ServerConnection], Awaitable[None]]


async def echo(connection: ServerConnection) -> None:
    """websockets' echo handler; a client closing while a message is on its way back is fine."""
    try:
        async for message in connection:
            await connection.send(message)
    except ConnectionClosed:
        pass


def echo_changing(change: Callable[[int, bytes], bytes | str | None]) -> Handler:
    """An echo handler that sends back ``change(message number, message)`` (None: nothing);
    a str goes back as a text message.
    """

    async def handler(connection: ServerConnection) -> None:
        number = 0
        try:
            async for message in connection:
                reply = change(number, cast(bytes, message))
                number += 1
                if reply is not None:
                    await connection.send(reply)
        except ConnectionClosed:
            pass

    return handler


@asynccontextmanager
async def websocket_server(
    handler: Handler = echo, *, context: ssl.SSLContext | None = None, **options: Any
) -> AsyncIterator[str]:
    """A websockets asyncio server on port 0; yields its ws:// (wss:// with ``context``) URL."""
    async with serve(handler, HOST, 0, ssl=context, compression=None, **options) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"{'wss' if context else 'ws'}://{HOST}:{port}/"


@pytest.fixture
async def ws_url() -> AsyncIterator[str]:
    async with websocket_server() as url:
        yield url


async def bench(url: str, **fields: Any) -> BenchResult:
    fields.setdefault("mode", "pingpong")
    fields.setdefault("size", 1024)
    fields.setdefault("connections", 4)
    if "requests" not in fields:
        fields.setdefault("duration", SHORT)
    return await run_bench(BenchConfig(url=url, **fields))


def assert_clean(result: BenchResult) -> None:
    assert result.errors == 0, result.error_kinds
    assert result.mismatched_bytes == 0, result.first_mismatch
    assert result.ok, result.problems()
    assert result.latency.total == result.round_trips
    assert result.echoed_bytes == result.round_trips * result.size


async def test_pingpong_against_websockets_own_echo_server(ws_url: str) -> None:
    result = await bench(ws_url)
    assert_clean(result)
    assert result.round_trips > 100
    assert result.connections_made == 4
    assert result.target == ws_url
    latency = result.latency_ms()
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]


async def test_requests_are_exact(ws_url: str) -> None:
    result = await bench(ws_url, requests=777, connections=5)
    assert_clean(result)
    assert result.round_trips == 777


@pytest.mark.parametrize(
    "fields",
    [
        {"pipeline": 8, "requests": 2000},
        {"rate": 200.0, "duration": 0.5},
        {"mode": "stream", "size": 16384, "connections": 2},
        {"mode": "oneshot", "size": 64, "requests": 50},
        {"mode": "hold", "size": 64, "connections": 50},
        {"size": 300_000, "connections": 2},
    ],
    ids=["pipeline", "rate", "stream", "oneshot", "hold", "large"],
)
async def test_every_mode_works_over_websocket(ws_url: str, fields: dict[str, Any]) -> None:
    result = await bench(ws_url, **fields)
    assert_clean(result)
    assert result.round_trips > 0
    if fields.get("mode") == "oneshot":
        assert result.connections_made == result.round_trips == 50
    if fields.get("mode") == "hold":
        assert result.round_trips == result.connections_made == 50
    if "rate" in fields:
        assert 80 <= result.round_trips <= 110


async def test_the_path_and_query_of_the_url_are_requested() -> None:
    paths: list[str] = []
    extensions: list[str | None] = []

    def record(connection: ServerConnection, request: Request) -> Response | None:
        paths.append(request.path)
        extensions.append(request.headers.get("Sec-WebSocket-Extensions"))
        if request.path != "/echo?room=1":
            return connection.respond(404, "no such path\n")
        return None

    async with websocket_server(process_request=record) as url:
        assert_clean(await bench(url + "echo?room=1", requests=10, connections=1))
        result = await bench(url + "elsewhere", connections=1)
    assert paths[0] == "/echo?room=1"
    assert extensions[0] is None  # no compression offered: the bench measures the echo
    assert not result.ok
    assert set(result.error_kinds) == {
        "WebSocket handshake: server rejected WebSocket connection: HTTP 404"
    }


async def test_fragmented_messages_and_pings_are_legitimate() -> None:
    async def fragment_and_ping(connection: ServerConnection) -> None:
        try:
            async for message in connection:
                await connection.ping()
                data = cast(bytes, message)
                await connection.send([data[:10], data[10:500], data[500:]])
        except ConnectionClosed:
            pass

    async with websocket_server(fragment_and_ping) as url:
        result = await bench(url, pipeline=3, connections=2)
    assert_clean(result)
    assert result.round_trips > 10


def flip_byte_5_of_message_2(number: int, message: bytes) -> bytes:
    if number != 2:
        return message
    corrupted = bytearray(message)
    corrupted[5] ^= 0xFF
    return bytes(corrupted)


@pytest.mark.parametrize(
    ("change", "mismatched", "first"),
    [
        (
            lambda number, message: message.decode("latin-1") if number == 1 else message,
            None,
            "message 1: sent binary, echoed as a text message",
        ),
        (flip_byte_5_of_message_2, 2, "message 2, byte 5: sent 0x"),
        (
            lambda number, message: message[:-1] if number == 3 else message,
            2,
            "message 3: sent 1024 bytes, echoed 1023",
        ),
        (
            lambda number, message: message + b"!" if number == 3 else message,
            2,
            "message 3: sent 1024 bytes, echoed 1025",
        ),
    ],
    ids=["text", "corrupted", "short", "long"],
)
async def test_a_wrong_echo_fails_the_run_with_its_reason(
    change: Callable[[int, bytes], bytes | str], mismatched: int | None, first: str
) -> None:
    async with websocket_server(echo_changing(change)) as url:
        result = await bench(url, connections=2)
    assert not result.ok
    assert result.errors == 0, result.error_kinds
    assert result.first_mismatch is not None
    assert first in result.first_mismatch
    if mismatched is not None:
        assert result.mismatched_bytes == mismatched
    else:
        assert result.mismatched_bytes >= 2 * 1024  # a whole message per connection
    assert any("echoed bytes differ" in problem for problem in result.problems())


async def test_a_text_message_with_the_same_bytes_is_still_a_mismatch() -> None:
    async def as_text(connection: ServerConnection) -> None:
        try:
            async for message in connection:
                await connection.send(cast(bytes, message), text=True)
        except ConnectionClosed:
            pass

    async with websocket_server(as_text) as url:
        result = await bench(url, connections=1, requests=3)
    assert result.mismatched_bytes == 3 * 1024
    assert result.first_mismatch is not None
    assert "echoed as a text message" in result.first_mismatch


def drop_message_3(number: int, message: bytes) -> bytes | None:
    return None if number == 3 else message


async def test_a_dropped_message_is_an_error_in_pingpong() -> None:
    async with websocket_server(echo_changing(drop_message_3)) as url:
        result = await bench(url, connections=1, duration=2, timeout=0.3)
    assert not result.ok
    assert result.round_trips == 3
    assert set(result.error_kinds) == {"no echo within 0.3s"}


async def test_reordered_messages_are_a_mismatch() -> None:
    async def swap_2_and_3(connection: ServerConnection) -> None:
        held: bytes | None = None
        try:
            async for number, message in aenumerate(connection):
                if number == 2:
                    held = cast(bytes, message)
                    continue
                await connection.send(message)
                if held is not None:
                    await connection.send(held)
                    held = None
        except ConnectionClosed:
            pass

    async with websocket_server(swap_2_and_3) as url:
        result = await bench(url, connections=1, pipeline=4)
    assert not result.ok
    assert result.first_mismatch is not None
    assert "message 2, byte " in result.first_mismatch


async def aenumerate(connection: ServerConnection) -> AsyncIterator[tuple[int, Data]]:
    number = 0
    async for message in connection:
        yield number, message
        number += 1


async def test_a_dropped_message_is_a_mismatch_with_a_pipeline() -> None:
    async with websocket_server(echo_changing(drop_message_3)) as url:
        result = await bench(url, connections=1, pipeline=4)
    assert not result.ok
    assert result.first_mismatch is not None
    assert "message 3, byte 0" in result.first_mismatch


@pytest.mark.parametrize(("code", "text"), [(1000, "1000 normal closure"), (1011, "1011 internal")])
async def test_the_server_closing_during_the_run_is_an_error(code: int, text: str) -> None:
    async def close_after_5(connection: ServerConnection) -> None:
        for _ in range(5):
            await connection.send(await connection.recv())
        await connection.close(code, "enough")

    async with websocket_server(close_after_5) as url:
        result = await bench(url, connections=1, duration=2)
    assert not result.ok
    assert result.round_trips == 5
    assert result.errors == 1
    [kind] = result.error_kinds
    assert kind.startswith(f"WebSocket: the server closed the connection ({text}")
    assert kind.endswith(": 'enough')")


class RawServer(asyncio.Protocol):
    """A WebSocket echo server on websockets' Sans-I/O ServerProtocol that breaks the rules its
    own way: ``masked`` masks its third echo (only clients may), ``hangup`` closes TCP instead
    of sending it (no close frame), ``abort`` drops TCP on the
    client's close frame, ``1011`` answers it with code 1011, ``empty`` with an empty close
    frame (lawful), ``silent`` never answers.
    """

    def __init__(self, how: str) -> None:
        self.how = how
        self.protocol = ServerProtocol()
        self.echoed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Request):
                protocol.send_response(protocol.accept(event))
            elif isinstance(event, Frame) and event.opcode is BINARY and protocol.state is OPEN:
                self.echoed += 1
                if self.how == "masked" and self.echoed == 3:
                    self._write(protocol.data_to_send())
                    self.transport.write(Frame(BINARY, event.data).serialize(mask=True))
                elif self.how == "hangup" and self.echoed == 3:
                    self._write(protocol.data_to_send())
                    self.transport.close()
                    return
                else:
                    protocol.send_binary(event.data)
            elif isinstance(event, Frame) and event.opcode is CLOSE:
                # All but the protocol's own answer: the close frame it echoes, then its end
                # of stream.
                self._write(protocol.data_to_send()[:-2])
                if self.how == "abort":
                    self.transport.abort()
                elif self.how != "silent":
                    body = Close(1011, "not today").serialize() if self.how == "1011" else b""
                    self.transport.write(Frame(CLOSE, body).serialize(mask=False))
                    self.transport.close()
                return
        self._write(protocol.data_to_send())

    def _write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.close()


@asynccontextmanager
async def raw_server(how: str) -> AsyncIterator[str]:
    """A :class:`RawServer` on port 0; yields its ws:// URL."""
    server = await asyncio.get_running_loop().create_server(lambda: RawServer(how), HOST, 0)
    async with server:
        yield f"ws://{HOST}:{server.sockets[0].getsockname()[1]}/"


@pytest.mark.parametrize(
    ("how", "kind"),
    [
        ("masked", "WebSocket: incorrect masking"),
        ("hangup", "WebSocket: the server closed the connection without a close frame"),
    ],
)
async def test_a_broken_connection_is_an_error_with_the_reason(how: str, kind: str) -> None:
    async with raw_server(how) as url:
        result = await bench(url, connections=1, duration=2)
    assert not result.ok
    assert result.round_trips == 2
    assert result.error_kinds == {kind: 1}


@pytest.mark.parametrize(
    ("how", "kind"),
    [
        ("abort", "WebSocket: the connection ended before the server's close frame"),
        ("1011", "WebSocket: the server answered our close with 1011 internal error: 'not today'"),
        ("silent", f"WebSocket: no close frame within {CLOSE_TIMEOUT_S:g}s"),
    ],
)
async def test_a_bad_close_at_the_end_of_the_run_is_an_error(how: str, kind: str) -> None:
    async with raw_server(how) as url:
        result = await bench(url, connections=2, duration=0.3)
    assert result.round_trips > 0
    assert result.mismatched_bytes == 0
    assert result.error_kinds == {kind: 2}
    assert result.errors == 2  # counted after the last tick, still in the result
    assert not result.ok


async def test_an_empty_close_frame_is_a_lawful_answer() -> None:
    async with raw_server("empty") as url:
        result = await bench(url, connections=2, duration=0.3)
    assert_clean(result)


async def test_a_plain_tcp_echo_server_fails_the_handshake(echo_port: int) -> None:
    result = await bench(f"ws://{HOST}:{echo_port}/", connections=2, duration=0.3)
    assert not result.ok
    assert result.round_trips == 0
    [kind] = result.error_kinds
    # It echoes our GET request back instead of answering it.
    assert kind.startswith("WebSocket handshake: did not receive a valid HTTP response"), kind


async def test_a_server_that_never_answers_the_handshake_times_out(silent_port: int) -> None:
    result = await bench(f"ws://{HOST}:{silent_port}/", connections=1, duration=2, timeout=0.3)
    assert not result.ok
    assert set(result.error_kinds) == {"WebSocket handshake: no response within 0.3s"}


async def test_processes_merge_over_websocket(ws_url: str) -> None:
    result = await bench(ws_url, connections=4, requests=1001, processes=2)
    assert_clean(result)
    assert result.round_trips == 1001


async def test_pingpong_against_echo_asyncs_own_listener() -> None:
    async with EchoServer(ServerConfig(listen=[f"ws://{HOST}:0/"])) as server:
        [url] = server.addresses
        assert url.startswith("ws://")
        result = await bench(url, connections=4)
        assert_clean(result)
        assert result.round_trips > 100
        assert_clean(await bench(url, mode="oneshot", size=64, requests=20))


@pytest.fixture
async def wss_url(certificate_authority: trustme.CA) -> AsyncIterator[str]:
    """A wss:// websockets echo server with a certificate for 127.0.0.1 from the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert(HOST).configure_cert(context)
    async with websocket_server(context=context) as url:
        yield url


async def test_wss_accepts_any_certificate_by_default(wss_url: str) -> None:
    result = await bench(wss_url, requests=200)
    assert_clean(result)
    assert result.target == wss_url


async def test_wss_verifies_with_a_ca(wss_url: str, ca_file: str) -> None:
    assert_clean(await bench(wss_url, tls_ca=ca_file, requests=200))
    assert_clean(await bench(wss_url, tls_ca=ca_file, mode="oneshot", size=64, requests=20))


async def test_wss_checks_the_host_of_the_url(wss_url: str, ca_file: str) -> None:
    # The certificate names 127.0.0.1, not localhost.
    result = await bench(wss_url.replace(HOST, "localhost"), tls_ca=ca_file, connections=1)
    assert not result.ok
    [kind] = result.error_kinds
    assert "CERTIFICATE_VERIFY_FAILED" in kind, kind


async def test_wss_sends_the_host_of_the_url_as_sni(certificate_authority: trustme.CA) -> None:
    names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("localhost").configure_cert(context)
    context.sni_callback = lambda connection, name, context: names.append(name)
    async with websocket_server(context=context) as url:
        result = await bench(url.replace(HOST, "localhost"), requests=10, connections=1)
    assert_clean(result)
    assert names == ["localhost"]


async def test_wss_rejects_a_certificate_from_another_ca(wss_url: str, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    result = await bench(wss_url, tls_ca=str(other), connections=1)
    assert not result.ok
    [kind] = result.error_kinds
    assert "CERTIFICATE_VERIFY_FAILED" in kind, kind


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="echo-async bench")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


async def test_the_command_runs_pingpong_over_wss(
    wss_url: str, ca_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "result.json"
    argv = ["--url", wss_url, "--tls-ca", ca_file, "--mode", "pingpong", "--connections", "2",
            "--size", "1KiB", "--duration", "0.3", "--json", str(path)]  # fmt: skip
    assert await asyncio.to_thread(cli.run, parse(argv)) == 0
    output = capsys.readouterr()
    assert wss_url in output.out  # the title names the target
    assert "latency p99" in output.out
    assert output.err == ""
    assert '"target": "' + wss_url + '"' in path.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--url", "http://127.0.0.1/"], "--url http://127.0.0.1/: scheme isn't ws or wss"),
        (["--url", "ws://"], "--url ws://: hostname isn't provided"),
        (["--url", "ws://127.0.0.1:99999/"], "--url ws://127.0.0.1:99999/: Port out of range"),
        (["--url", "ws://127.0.0.1:http/"], "--url ws://127.0.0.1:http/: Port could not be cast"),
        (["--url", "ws://127.0.0.1:0/"], "the port must be between 1 and 65535"),
        (["--url", "ws://127.0.0.1/#here"], "fragment identifier is meaningless"),
        (["--url", "ws://127.0.0.1:80/", "--port", "81"], "drop --port"),
        (["--url", "ws://127.0.0.1/", "--host", "example.com"], "drop --host"),
        (["--url", "ws://127.0.0.1/", "--unix", "/tmp/x"], "drop --unix"),
        (["--url", "ws://127.0.0.1/", "--udp"], "drop --udp"),
        (["--url", "ws://127.0.0.1/", "--greeting"], "drop --greeting"),
        (["--url", "ws://127.0.0.1/", "--tls"], "--tls needs a wss:// URL"),
        (["--url", "ws://127.0.0.1/", "--tls-ca", "/x.pem"], "--tls-ca needs a wss:// URL"),
        (["--url", "wss://127.0.0.1/", "--tls-ca", "/no/ca.pem"], "--tls-ca /no/ca.pem: "),
    ],
)
def test_url_usage_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--mode", "pingpong", "--connections", "1", "--size", "64", "--duration", "1"]
    assert cli.run(parse(base + argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("echo-async bench: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_the_url_gives_host_port_and_tls() -> None:
    config = BenchConfig(
        mode="pingpong", connections=1, size=64, duration=1, url="wss://Example.com/x"
    )
    assert (config.host, config.port, config.tls) == ("example.com", 443, True)
    assert config.target == "wss://Example.com/x"
    # A worker process gets the config back through to_dict: the repeated fields agree.
    assert BenchConfig(**config.share(0, 1).to_dict()) == config
