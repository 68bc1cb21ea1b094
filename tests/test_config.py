"""ServerConfig validation: every bad value raises one ConfigError naming the option."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import pytest

from echo_async import ConfigError, ServerConfig
from echo_async.config import OPTIONS, OPTIONS_BY_NAME, ServiceConfig, option_flag
from echo_async.listeners import UNIX_PATH_MAX


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
    ],
)
def test_invalid_values_name_the_field(option: str, value: Any, message: str) -> None:
    # From Python the error names the field as the caller wrote it, not a command-line flag.
    with pytest.raises(ConfigError) as raised:
        ServerConfig(**{option: value})
    assert str(raised.value).startswith(message)
    assert raised.value.option == raised.value.field == option
    assert "\n" not in str(raised.value)


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
