"""ServerConfig validation: every bad value raises one ConfigError naming the option."""

from __future__ import annotations

import asyncio
import resource
import shutil
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import echo_async.config as config_module
from echo_async import ConfigError, EchoServer, ServerConfig
from echo_async.config import OPTIONS, OPTIONS_BY_NAME, ServiceConfig, option_flag
from echo_async.listeners import UNIX_PATH_MAX
from echo_async.sources import load_service_config, read_config_file, render_toml


def test_defaults_are_safe() -> None:
    config = ServerConfig()
    assert config.host == "127.0.0.1"  # not opened to the network unless asked
    assert config.port == 12000
    assert config.shutdown_timeout == 10.0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("port", 70000, "port: 70000 is out of range 0..65535"),
        ("port", -1, "port: -1 is out of range 0..65535"),
        ("port", "80", "port: expected an integer, got '80'"),
        ("port", True, "port: expected an integer"),
        ("backlog", 0, "backlog: 0 is out of range"),
        ("shutdown_timeout", -1.0, "shutdown_timeout: -1.0 is not a non-negative"),
        ("shutdown_timeout", float("nan"), "shutdown_timeout: nan"),
        ("shutdown_timeout", float("inf"), "shutdown_timeout: inf"),
        ("host", "", "host: must not be empty"),
        ("write_buffer_high", 10, "write_buffer_high: 10 is out of range"),
        ("listen", ("sctp://127.0.0.1:1",), "listen: 'sctp://127.0.0.1:1': expected"),
        ("greeting", "two\nlines", "greeting: must be one line"),
        ("listen", ("ws://127.0.0.1:1/a?b",), "listen: 'ws://127.0.0.1:1/a?b': the path must"),
        ("listen", ("ws://127.0.0.1:1/a b",), "listen: 'ws://127.0.0.1:1/a b': the path must"),
        ("listen", ("wss://127.0.0.1:1/",), "listen: wss://127.0.0.1:1/ needs --tls-cert"),
        ("ws_max_message", -1, "ws_max_message: -1 is out of range"),
        ("ws_handshake_timeout", 0, "ws_handshake_timeout: must be more than 0"),
    ],
)
def test_invalid_values_name_the_field(option: str, value: Any, message: str) -> None:
    # From Python the error names the field as the caller wrote it, not a command-line flag.
    with pytest.raises(ConfigError) as raised:
        ServerConfig(**{option: value})
    assert str(raised.value).startswith(message)
    assert raised.value.option == raised.value.field == option
    assert "\n" not in str(raised.value)


def test_websocket_listeners_keep_their_path() -> None:
    config = ServerConfig(listen=("ws://127.0.0.1:80", "ws://[::1]:81/echo/v1"))
    assert [(item.scheme, item.host, item.port, item.path) for item in config.listeners] == [
        ("ws", "127.0.0.1", 80, "/"),
        ("ws", "::1", 81, "/echo/v1"),
    ]
    assert [item.url for item in config.listeners] == [
        "ws://127.0.0.1:80/",
        "ws://[::1]:81/echo/v1",
    ]


def test_service_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^metrics: expected HOST:PORT") as raised:
        ServiceConfig(metrics="nohost")
    assert raised.value.field == "metrics"
    with pytest.raises(ConfigError, match=r"^workers: 0 is out of range"):
        ServiceConfig(workers=0)


@pytest.mark.parametrize("urls", [["tcp://127.0.0.1:0"], ("tcp://127.0.0.1:0",)])
def test_listen_takes_any_sequence_of_urls(urls: Sequence[str]) -> None:
    config = ServerConfig(listen=urls)
    assert config.listen == ("tcp://127.0.0.1:0",)
    assert config == ServerConfig(listen=("tcp://127.0.0.1:0",))
    assert hash(config) == hash(ServerConfig(listen=("tcp://127.0.0.1:0",)))


@pytest.mark.parametrize("urls", ["tcp://127.0.0.1:0", b"tcp://127.0.0.1:0", None, 5])
def test_listen_is_not_a_bare_string(urls: Any) -> None:
    with pytest.raises(ConfigError, match=r"^listen: expected a list of URLs, got "):
        ServerConfig(listen=urls)


TEXT_OPTIONS = [option.name for option in OPTIONS if option.kind in (str, tuple)]


@pytest.mark.parametrize("name", TEXT_OPTIONS)
def test_text_that_is_not_utf8_is_refused(name: str) -> None:
    # A non-UTF-8 byte in argv or the environment arrives as a lone surrogate (surrogateescape);
    # accepted, it made every greeting a UnicodeEncodeError and --print-config unreadable.
    text = "caf\udce9"
    value: Any = (f"unix:///tmp/{text}",) if name == "listen" else text
    build = ServerConfig if OPTIONS_BY_NAME[name].scope == "server" else ServiceConfig
    with pytest.raises(ConfigError) as raised:
        build(**{name: value})
    assert raised.value.field == name
    if not OPTIONS_BY_NAME[name].choices:
        assert str(raised.value).startswith(f"{name}: not valid UTF-8 text: ")
    assert "\n" not in str(raised.value)


def test_unix_socket_path_over_the_limit_is_a_config_error() -> None:
    # sun_path holds 108 bytes on Linux, the NUL included; binding longer said "[errno none]".
    limit = UNIX_PATH_MAX
    fits = "/tmp/" + "x" * (limit - len("/tmp/"))
    assert ServerConfig(listen=(f"unix://{fits}",)).listen == (f"unix://{fits}",)
    with pytest.raises(ConfigError) as raised:
        ServerConfig(listen=(f"unix://{fits}x",))
    message = str(raised.value)
    assert message.startswith("listen: ")
    assert f"the path is too long for a Unix socket ({limit + 1} bytes; the limit is {limit})" in (
        message
    )
    # The limit counts bytes, not characters.
    with pytest.raises(ConfigError, match="too long"):
        ServerConfig(listen=("unix:///tmp/" + "é" * (limit // 2),))


def test_unix_socket_limit_matches_the_os() -> None:
    if sys.platform != "linux":
        pytest.skip("sun_path is 108 bytes on Linux")
    assert UNIX_PATH_MAX == 107


def test_config_is_frozen() -> None:
    config = ServerConfig()
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


def test_every_option_has_a_flag_and_a_variable() -> None:
    names = [option.name for option in OPTIONS]
    assert {"listen", "host", "port", "tls_cert", "udp_rate"} <= set(names)
    assert len(set(names)) == len(names)
    port = OPTIONS_BY_NAME["port"]
    assert (port.flag, port.environment_variable) == ("--port", "ECHO_ASYNC_PORT")
    assert option_flag("shutdown_timeout") == "--shutdown-timeout"


def test_proxy_protocol_is_allowed_on_tls_listeners() -> None:
    config = ServerConfig(
        listen=("tls://127.0.0.1:0",), tls_cert="c", tls_key="k", proxy_protocol="required"
    )
    assert config.proxy_protocol == "required"


def test_tls_alpn_is_a_comma_separated_list() -> None:
    assert ServerConfig(tls_alpn="echo, h2").alpn_protocols == ["echo", "h2"]
    assert ServerConfig().alpn_protocols == []
    with pytest.raises(ConfigError, match=r"^tls_alpn: "):
        ServerConfig(tls_alpn="x" * 256)


# -- backlog: the OS maximum by default ---------------------------------------------------------


def somaxconn() -> int:
    """What the OS grants a listen() backlog, read independently of echo_async."""
    if sys.platform != "linux":
        return socket.SOMAXCONN
    with open("/proc/sys/net/core/somaxconn") as file:
        return int(file.read())


def test_backlog_defaults_to_what_the_os_allows() -> None:
    # A default of 1024 dropped the SYNs of a 9000-client burst the kernel would have queued;
    # those clients retried only after 1 s and 3 s.
    assert ServerConfig().backlog == somaxconn()
    assert OPTIONS_BY_NAME["backlog"].default == somaxconn()
    assert ServiceConfig().server.backlog == somaxconn()
    assert "net.core.somaxconn" in OPTIONS_BY_NAME["backlog"].help


@pytest.mark.parametrize("content", [None, "", "garbage\n", "0\n", "-5\n"])
def test_backlog_falls_back_to_socket_somaxconn(
    content: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "somaxconn"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(config_module, "SOMAXCONN_PATH", str(path))
    assert config_module.os_max_backlog() == socket.SOMAXCONN
    assert ServerConfig().backlog == socket.SOMAXCONN


def test_backlog_follows_somaxconn_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sys.platform != "linux":
        pytest.skip("net.core.somaxconn is Linux's")
    path = tmp_path / "somaxconn"
    monkeypatch.setattr(config_module, "SOMAXCONN_PATH", str(path))
    path.write_text("65536\n")  # above 65535: allowed since Linux 5.4 (a 32-bit field)
    assert ServerConfig().backlog == 65536
    path.write_text("123\n")
    assert ServerConfig().backlog == 123


@pytest.mark.parametrize("value", [1, 7, 1024, 100_000])
def test_an_explicit_backlog_is_kept(value: int) -> None:
    assert ServerConfig(backlog=value).backlog == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "backlog: 0 is out of range 1..2147483647"),
        (-1, "backlog: -1 is out of range"),
        (1 << 31, "backlog: 2147483648 is out of range"),
        (True, "backlog: expected an integer"),
        ("4096", "backlog: expected an integer, got '4096'"),
        (4096.0, "backlog: expected an integer"),
    ],
)
def test_an_explicit_backlog_is_validated(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ServerConfig(backlog=value)
    assert str(raised.value).startswith(message)
    assert raised.value.field == "backlog"


def test_the_default_backlog_is_printed_as_a_config_file_reads_it_back(tmp_path: Path) -> None:
    # --print-config writes the resolved number, so its output is a --config file as it was.
    text = render_toml(ServiceConfig())
    assert f"backlog = {somaxconn()}\n" in text
    path = tmp_path / "echo.toml"
    path.write_text(text)
    assert read_config_file(str(path))["backlog"] == somaxconn()
    assert load_service_config({}, {}, str(path)) == ServiceConfig()
    pinned = load_service_config({}, {"ECHO_ASYNC_BACKLOG": "77"}, str(path))
    assert pinned.server.backlog == 77


async def listen_backlog(port: int) -> int | None:
    """The backlog of the socket listening on `port`: `ss` shows it as Send-Q; None without ss."""
    ss = shutil.which("ss")
    if ss is None or sys.platform != "linux":
        return None
    process = await asyncio.create_subprocess_exec(
        ss, "-Hltn", f"sport = :{port}", stdout=asyncio.subprocess.PIPE
    )
    output, _ = await process.communicate()
    rows = [line.split() for line in output.decode().splitlines() if line.strip()]
    # State Recv-Q Send-Q Local Peer; for a listening socket Send-Q is its backlog.
    (row,) = rows
    return int(row[2])


async def test_a_server_on_defaults_listens_with_the_os_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passed: list[int] = []
    start_server = asyncio.start_server

    async def spy(*args: Any, **kwargs: Any) -> asyncio.Server:
        passed.append(kwargs["backlog"])
        return await start_server(*args, **kwargs)

    monkeypatch.setattr(asyncio, "start_server", spy)
    async with EchoServer(ServerConfig(host="127.0.0.1", port=0)) as server:
        assert passed == [somaxconn()]
        kernel = await listen_backlog(server.port)
        assert kernel in (None, somaxconn())


async def test_an_explicit_backlog_reaches_the_listening_socket() -> None:
    async with EchoServer(ServerConfig(host="127.0.0.1", port=0, backlog=37)) as server:
        kernel = await listen_backlog(server.port)
        if kernel is None:
            pytest.skip("no ss to read the listening socket's backlog")
        assert kernel == 37


def syn_retransmits(sock: Any) -> int:
    """Segments a connected client socket retransmitted (its SYN included): tcpi_total_retrans."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 100)[0])


async def test_a_burst_of_clients_on_defaults_connects_without_a_retry() -> None:
    # Clients connecting at once beyond the backlog have their SYNs dropped (ListenOverflows) and
    # connect only after a 1 s retry; with 1024 here, about half of 2000 clients did.
    clients = min(2000, somaxconn())
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * clients + 100:
        pytest.skip("too few file descriptors for the burst")
    linux = sys.platform == "linux"

    async def echo(port: int, index: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            payload = b"%d\n" % index
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            return syn_retransmits(writer.get_extra_info("socket")) if linux else 0
        finally:
            writer.close()
            await writer.wait_closed()

    async with EchoServer(ServerConfig(host="127.0.0.1", port=0)) as server:
        async with asyncio.timeout(60):
            retransmits = await asyncio.gather(*(echo(server.port, i) for i in range(clients)))
    assert len(retransmits) == clients
    retried = sum(1 for count in retransmits if count)
    assert retried == 0, f"{retried} of {clients} clients retransmitted"
