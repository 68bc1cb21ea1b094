"""ServerConfig validation: every bad value raises one ConfigError naming the option."""

from __future__ import annotations

from typing import Any

import pytest

from echo_async import ConfigError, ServerConfig
from echo_async.config import OPTIONS, OPTIONS_BY_NAME, option_flag


def test_defaults_are_safe() -> None:
    config = ServerConfig()
    assert config.host == "127.0.0.1"  # not opened to the network unless asked
    assert config.port == 12000
    assert config.shutdown_timeout == 10.0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("port", 70000, "--port: 70000 is out of range 0..65535"),
        ("port", -1, "--port: -1 is out of range 0..65535"),
        ("port", "80", "--port: expected an integer, got '80'"),
        ("port", True, "--port: expected an integer"),
        ("backlog", 0, "--backlog: 0 is out of range"),
        ("shutdown_timeout", -1.0, "--shutdown-timeout: -1.0 is not a non-negative"),
        ("shutdown_timeout", float("nan"), "--shutdown-timeout: nan"),
        ("shutdown_timeout", float("inf"), "--shutdown-timeout: inf"),
        ("host", "", "--host: must not be empty"),
        ("write_buffer_high", 10, "--write-buffer-high: 10 is out of range"),
    ],
)
def test_invalid_values_name_the_option(option: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ServerConfig(**{option: value})
    assert str(raised.value).startswith(message)
    assert raised.value.option == option_flag(option)
    assert "\n" not in str(raised.value)


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
    with pytest.raises(ConfigError, match="--tls-alpn"):
        ServerConfig(tls_alpn="x" * 256)
