"""Transports: UDP, Unix sockets, TLS and IPv6, several listeners in one server, byte-exact."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import ssl
import stat
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme

from echo_async import ConfigError, EchoServer, ServerConfig
from echo_async.udp import MAX_DATAGRAM, DatagramEcho
from tests.conftest import echo_once, wait_for


def closed(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in logs if record["event"] == "connection closed"]


def handshake_failures(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in logs if record["event"] == "tls handshake failed"]


# -- UDP -----------------------------------------------------------------------------------------


class DatagramClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)


async def udp_client(port: int, source: str = "127.0.0.1") -> tuple[Any, DatagramClient]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        DatagramClient, remote_addr=("127.0.0.1", port), local_addr=(source, 0)
    )
    return transport, protocol


async def test_udp_echoes_each_datagram_whole(logs: list[dict[str, Any]]) -> None:
    config = ServerConfig(listen=("udp://127.0.0.1:0",))
    async with EchoServer(config) as server:
        assert server.addresses == [f"udp://127.0.0.1:{server.port}"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            for size in (0, 1, 1024, 9000, MAX_DATAGRAM):
                payload = os.urandom(size)
                client.sendto(payload, ("127.0.0.1", server.port))
                assert await asyncio.to_thread(client.recv, 65535) == payload
        assert server.stats.datagrams_out == 5
    (summary,) = [r for r in logs if r["event"] == "udp summary"]
    assert summary["datagrams_in"] == summary["datagrams_out"] == 5


async def test_udp_rate_limit_drops_excess_per_source() -> None:
    config = ServerConfig(listen=("udp://127.0.0.1:0",), udp_rate=1, udp_burst=5)
    async with EchoServer(config) as server:
        noisy_transport, _ = await udp_client(server.port)
        for index in range(50):
            noisy_transport.sendto(index.to_bytes(2, "big"))
        await wait_for(lambda: server.stats.datagrams_in == 50)
        assert 5 <= server.stats.datagrams_out <= 6  # the burst, plus at most one refilled token
        assert server.stats.datagrams_dropped == 50 - server.stats.datagrams_out
        # Another source address has its own bucket.
        quiet_transport, quiet = await udp_client(server.port, "127.0.0.2")
        quiet_transport.sendto(b"me too")
        assert await asyncio.wait_for(quiet.received.get(), 5) == b"me too"
        noisy_transport.close()
        quiet_transport.close()


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 12000) if name == "sockname" else None

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


@pytest.mark.parametrize("source_port", [7, 13, 17, 19, 37])
def test_udp_never_answers_the_small_services_ports(source_port: int) -> None:
    echo = DatagramEcho(rate=0, burst=1, log=_NullLog())
    transport = RecordingTransport()
    echo.connection_made(transport)  # type: ignore[arg-type]
    echo.datagram_received(b"chargen says hi", ("10.0.0.1", source_port))
    echo.datagram_received(b"a client", ("10.0.0.1", 40000))
    assert transport.sent == [(b"a client", ("10.0.0.1", 40000))]
    assert echo.dropped == {"loop_port": 1}


def test_udp_never_answers_its_own_address() -> None:
    echo = DatagramEcho(rate=0, burst=1, log=_NullLog())
    transport = RecordingTransport()
    echo.connection_made(transport)  # type: ignore[arg-type]
    echo.datagram_received(b"me", ("127.0.0.1", 12000))
    assert transport.sent == []
    assert echo.dropped == {"own_address": 1}


async def test_udp_from_port_19_gets_no_answer_over_real_sockets() -> None:
    if os.geteuid() != 0:
        pytest.skip("binding source port 19 needs root; the unit tests above cover the rule")
    async with EchoServer(ServerConfig(listen=("udp://127.0.0.1:0",))) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as chargen:
            chargen.bind(("127.0.0.1", 19))
            chargen.sendto(b"loop?", ("127.0.0.1", server.port))
            await wait_for(lambda: server.stats.datagrams_in == 1)
            chargen.settimeout(0.3)
            with pytest.raises(TimeoutError):
                chargen.recv(100)
        assert server.stats.datagrams_dropped == 1


class _NullLog:
    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass


# -- Unix sockets --------------------------------------------------------------------------------


async def unix_echo(path: str, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(payload)
    writer.write_eof()
    echoed = await reader.read()
    writer.close()
    return echoed


async def test_unix_socket_round_trip_mode_and_cleanup(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    async with EchoServer(ServerConfig(listen=(f"unix://{path}",))) as server:
        assert server.addresses == [f"unix://{path}"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        payload = os.urandom(200_000)
        assert await unix_echo(path, payload) == payload
    assert not Path(path).exists()  # removed at shutdown  # noqa: ASYNC240


async def test_unix_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(path)  # a file nobody listens on, as a crashed process leaves it
    leftover.close()
    config = ServerConfig(listen=(f"unix://{path}",), unix_mode="0600")
    async with EchoServer(config):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert await unix_echo(path, b"fresh") == b"fresh"


async def test_unix_socket_in_use_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    async with EchoServer(ServerConfig(listen=(f"unix://{path}",))):
        second = EchoServer(ServerConfig(listen=(f"unix://{path}",)))
        with pytest.raises(ConfigError, match="another process is listening"):
            await second.start()
        assert await unix_echo(path, b"first still serves") == b"first still serves"


async def test_unix_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        await EchoServer(ServerConfig(listen=(f"unix://{path}",))).start()
    assert path.read_text() == "precious"


# -- TLS -----------------------------------------------------------------------------------------


def client_context(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


def tls_config(files: dict[str, str], **extra: Any) -> ServerConfig:
    return ServerConfig(
        listen=("tls://127.0.0.1:0",), tls_cert=files["tls_cert"], tls_key=files["tls_key"], **extra
    )


async def tls_echo(port: int, context: ssl.SSLContext, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
    )

    async def send() -> None:
        writer.write(payload)
        await writer.drain()

    received = bytearray()

    async def receive() -> None:
        while len(received) < len(payload):
            chunk = await reader.read(65536)
            if not chunk:
                break
            received.extend(chunk)

    await asyncio.gather(send(), receive())
    writer.close()
    return bytes(received)


async def test_tls_one_mib_round_trip(
    tls_files: dict[str, str], logs: list[dict[str, Any]]
) -> None:
    async with EchoServer(tls_config(tls_files)) as server:
        assert server.addresses == [f"tls://127.0.0.1:{server.port}"]
        payload = os.urandom(1024 * 1024)
        assert await tls_echo(server.port, client_context(tls_files["ca"]), payload) == payload
    (record,) = closed(logs)
    assert record["bytes_in"] == record["bytes_out"] == 1024 * 1024


async def test_tls_1_1_is_refused(tls_files: dict[str, str], logs: list[dict[str, Any]]) -> None:
    async with EchoServer(tls_config(tls_files)) as server:
        old = client_context(tls_files["ca"])
        with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: that's the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_echo(server.port, old, b"old client")
        modern = client_context(tls_files["ca"])
        assert await tls_echo(server.port, modern, b"new client") == b"new client"
        await wait_for(lambda: len(handshake_failures(logs)) == 1)
        assert "protocol" in handshake_failures(logs)[0]["error"]


async def test_plaintext_on_the_tls_port_is_closed_and_others_are_served(
    tls_files: dict[str, str],
    logs: list[dict[str, Any]],
    loop_errors: list[dict[str, Any]],
) -> None:
    async with EchoServer(tls_config(tls_files)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n" * 10)
        # Whatever the server says (a TLS alert at most), it never echoes the plaintext.
        response = await asyncio.wait_for(reader.read(), 5)
        assert b"GET" not in response
        writer.close()
        payload = os.urandom(10_000)
        assert await tls_echo(server.port, client_context(tls_files["ca"]), payload) == payload
        assert server.stats.connections_rejected == 1
    (failure,) = handshake_failures(logs)
    assert failure["reason"] == "tls_handshake"
    assert failure["error"]  # the TLS library's one-line reason
    assert not closed(logs)[:-1]  # only the good client's close record
    assert not loop_errors


async def test_tls_handshake_timeout_closes_silent_clients(
    tls_files: dict[str, str], logs: list[dict[str, Any]]
) -> None:
    async with EchoServer(tls_config(tls_files, tls_handshake_timeout=0.3)) as server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        payload = os.urandom(1000)  # meanwhile another client is served
        assert await tls_echo(server.port, client_context(tls_files["ca"]), payload) == payload
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - started < 4
        writer.close()

        def reported() -> bool:
            gc.collect()  # the timed-out handshake is reported when its TLS object is freed
            return len(handshake_failures(logs)) == 1

        await wait_for(reported)
    (failure,) = handshake_failures(logs)
    assert failure["error"].startswith("handshake not completed")


async def test_mutual_tls_requires_a_client_certificate(
    certificate_authority: trustme.CA, tls_files: dict[str, str]
) -> None:
    config = tls_config(tls_files, tls_client_ca=tls_files["ca"])
    async with EchoServer(config) as server:
        anonymous = client_context(tls_files["ca"])
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_echo(server.port, anonymous, b"who am I" * 1000)
        identified = client_context(tls_files["ca"])
        certificate_authority.issue_cert("client@example.com").configure_cert(identified)
        assert await tls_echo(server.port, identified, b"it is me") == b"it is me"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tls_cert": "/nonexistent/cert.pem"}, "--tls-cert: cannot read /nonexistent/cert.pem"),
        ({"tls_key": "/nonexistent/key.pem"}, "--tls-key: cannot read /nonexistent/key.pem"),
        ({"tls_client_ca": "/nonexistent/ca.pem"}, "--tls-client-ca: cannot load"),
    ],
)
async def test_unreadable_certificates_name_the_option(
    tls_files: dict[str, str], change: dict[str, str], message: str
) -> None:
    config = tls_config({**tls_files, **change}, tls_client_ca=change.get("tls_client_ca", ""))
    server = EchoServer(config)
    with pytest.raises(ConfigError, match=message):
        await server.start()
    assert server.addresses == []


async def test_a_key_that_does_not_match_is_refused(
    certificate_authority: trustme.CA, tls_files: dict[str, str], tmp_path: Path
) -> None:
    other_key = tmp_path / "other.key"
    certificate_authority.issue_cert("elsewhere").private_key_pem.write_to_path(str(other_key))
    with pytest.raises(ConfigError, match="--tls-cert: cannot load"):
        await EchoServer(tls_config({**tls_files, "tls_key": str(other_key)})).start()


# -- IPv6 and several listeners ------------------------------------------------------------------


async def test_ipv6_loopback_logs_canonical_peer(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(ServerConfig(listen=("tcp://[::1]:0",))) as server:
        assert server.addresses == [f"tcp://[::1]:{server.port}"]
        assert await echo_once(server.port, b"six", host="::1") == b"six"
    (record,) = closed(logs)
    assert record["peer"].startswith("[::1]:")


async def test_ipv6_wildcard_serves_ipv4_too(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(ServerConfig(listen=("tcp://[::]:0",))) as server:
        assert await echo_once(server.port, b"four", host="127.0.0.1") == b"four"
        assert await echo_once(server.port, b"six", host="::1") == b"six"
    peers = sorted(record["peer"].rsplit(":", 1)[0] for record in closed(logs))
    assert peers == ["127.0.0.1", "[::1]"]  # IPv4-mapped addresses logged as IPv4


async def test_several_listeners_in_one_server(tls_files: dict[str, str], tmp_path: Path) -> None:
    path = str(tmp_path / "many.sock")
    config = ServerConfig(
        listen=(
            "tcp://127.0.0.1:0",
            "udp://127.0.0.1:0",
            f"unix://{path}",
            "tls://127.0.0.1:0",
            "tcp://[::1]:0",
        ),
        tls_cert=tls_files["tls_cert"],
        tls_key=tls_files["tls_key"],
    )
    async with EchoServer(config) as server:
        urls = server.addresses
        assert [url.split("://")[0] for url in urls] == ["tcp", "udp", "unix", "tls", "tcp"]
        ports = [int(url.rsplit(":", 1)[1]) for url in urls if not url.startswith("unix")]
        tcp_port, udp_port, tls_port, v6_port = ports
        assert await echo_once(tcp_port, b"tcp") == b"tcp"
        assert await unix_echo(path, b"unix") == b"unix"
        assert await tls_echo(tls_port, client_context(tls_files["ca"]), b"tls") == b"tls"
        assert await echo_once(v6_port, b"v6", host="::1") == b"v6"
        transport, client = await udp_client(udp_port)
        transport.sendto(b"udp")
        assert await asyncio.wait_for(client.received.get(), 5) == b"udp"
        transport.close()
        stats = server.stats
        assert stats.connections_total == 4
        assert stats.bytes_in == len(b"tcpunixtlsv6udp")


async def test_udp_beyond_loopback_warns(logs: list[dict[str, Any]]) -> None:
    async with EchoServer(ServerConfig(listen=("udp://0.0.0.0:0",))):
        pass
    (warning,) = [r for r in logs if r["log_level"] == "warning"]
    assert "reflection" in warning["event"]
    async with EchoServer(ServerConfig(listen=("udp://127.0.0.1:0",))):
        pass
    assert len([r for r in logs if r["log_level"] == "warning"]) == 1


async def test_metrics_carry_the_transport(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from echo_async.metrics import ServerMetrics

    metrics = ServerMetrics(CollectorRegistry())
    path = str(tmp_path / "m.sock")
    config = ServerConfig(listen=("tcp://127.0.0.1:0", "udp://127.0.0.1:0", f"unix://{path}"))
    async with EchoServer(config, metrics=metrics) as server:
        tcp_port = int(server.addresses[0].rsplit(":", 1)[1])
        udp_port = int(server.addresses[1].rsplit(":", 1)[1])
        assert await echo_once(tcp_port, b"12345") == b"12345"
        assert await unix_echo(path, b"123") == b"123"
        transport, client = await udp_client(udp_port)
        transport.sendto(b"1234567")
        assert await asyncio.wait_for(client.received.get(), 5) == b"1234567"
        transport.close()
    sample = metrics.registry.get_sample_value
    assert sample("echo_bytes_received_total", {"transport": "tcp"}) == 5
    assert sample("echo_bytes_received_total", {"transport": "unix"}) == 3
    assert sample("echo_bytes_received_total", {"transport": "udp"}) == 7
    assert sample("echo_datagrams_sent_total") == 1
    assert sample("echo_connections_total", {"transport": "unix"}) == 1
