"""Configuration sources: flags > environment > file > defaults, and errors naming the source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from echo_async import ConfigError
from echo_async.config import ServiceConfig
from echo_async.sources import load_service_config, read_config_file, render_toml


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "echo.toml"
    path.write_text(text)
    return str(path)


def test_defaults_when_nothing_is_given() -> None:
    assert load_service_config({}, {}) == ServiceConfig()


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 1001\nbacklog = 7\nidle_timeout = 5\nlog_level = "debug"\n')
    environ = {"ECHO_ASYNC_PORT": "1002", "ECHO_ASYNC_BACKLOG": "8"}
    config = load_service_config({"port": 1003}, environ, path)
    assert config.server.port == 1003  # flag
    assert config.server.backlog == 8  # environment beats file
    assert config.server.idle_timeout == 5.0  # file beats default (an int is fine for seconds)
    assert config.log_level == "debug"
    assert config.server.host == "127.0.0.1"  # default


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "max_connections = 5\n")
    config = load_service_config({}, {"ECHO_ASYNC_CONFIG": path})
    assert config.server.max_connections == 5


def test_booleans_from_environment_and_file(tmp_path: Path) -> None:
    assert load_service_config({}, {"ECHO_ASYNC_REUSE_PORT": "yes"}).server.reuse_port
    assert not load_service_config(
        {}, {}, write(tmp_path, "reuse_port = false\n")
    ).server.reuse_port


@pytest.mark.parametrize(
    ("flags", "environ", "file_text", "message"),
    [
        ({"port": 70000}, {}, None, "--port: 70000 is out of range 0..65535"),
        ({}, {"ECHO_ASYNC_PORT": "70000"}, None, "ECHO_ASYNC_PORT: 70000 is out of range"),
        ({}, {"ECHO_ASYNC_PORT": "many"}, None, "ECHO_ASYNC_PORT: expected an integer, got 'many'"),
        ({}, {"ECHO_ASYNC_REUSE_PORT": "perhaps"}, None, "ECHO_ASYNC_REUSE_PORT: expected true"),
        ({}, {}, "port = 70000\n", "echo.toml: port: 70000 is out of range"),
        ({}, {}, "idle_timeout = -1\n", "echo.toml: idle_timeout: -1.0 is not a non-negative"),
        ({}, {}, 'port = "12000"\n', "echo.toml: port: expected int, got '12000'"),
        ({}, {}, "prot = 1\n", "echo.toml: prot: unknown option"),
        ({}, {}, "idle-timeout = 1\n", "unknown option (did you mean idle_timeout?)"),
        ({}, {}, "port = [\n", "--config: "),
        ({}, {}, 'loop = "trio"\n', "echo.toml: loop: 'trio' is not one of auto, uvloop, asyncio"),
        ({}, {}, 'metrics = "nohost"\n', "echo.toml: metrics: expected HOST:PORT"),
        ({"workers": 0}, {}, None, "--workers: 0 is out of range"),
        # ServerConfig names the field (listen); each source names it as the user wrote it.
        ({"listen": ("sctp://h:1",)}, {}, None, "--listen: 'sctp://h:1': expected"),
        ({}, {"ECHO_ASYNC_LISTEN": "sctp://h:1"}, None, "ECHO_ASYNC_LISTEN: 'sctp://h:1'"),
        ({}, {}, 'listen = ["sctp://h:1"]\n', "echo.toml: listen: 'sctp://h:1': expected"),
        ({"listen": ("unix:///" + "x" * 200,)}, {}, None, "--listen: 'unix:///xxx"),
        # Non-UTF-8 bytes in argv or the environment arrive as lone surrogates.
        ({"greeting": "caf\udce9"}, {}, None, "--greeting: not valid UTF-8 text"),
        ({}, {"ECHO_ASYNC_GREETING": "caf\udce9"}, None, "ECHO_ASYNC_GREETING: not valid UTF-8"),
        ({}, {"ECHO_ASYNC_HOST": "h\udcff"}, None, "ECHO_ASYNC_HOST: not valid UTF-8 text"),
        ({"listen": ("unix:///tmp/\udce9",)}, {}, None, "--listen: not valid UTF-8 text"),
    ],
)
def test_errors_name_where_the_bad_value_came_from(
    tmp_path: Path,
    flags: dict[str, object],
    environ: dict[str, str],
    file_text: str | None,
    message: str,
) -> None:
    path = write(tmp_path, file_text) if file_text is not None else None
    with pytest.raises(ConfigError) as raised:
        load_service_config(flags, environ, path)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'greeting = "caf\xe9"\n', "(byte 0xe9 on line 1)"),
        (b'port = 1\ngreeting = "\xff"\n', "(byte 0xff on line 2)"),
        ("port = 1\n".encode("utf-16"), "(it is UTF-16; save it as UTF-8)"),
        (b"\xfe\xff" + "port = 1\n".encode("utf-16-be"), "(it is UTF-16; save it as UTF-8)"),
    ],
)
def test_a_file_that_is_not_utf8_is_a_config_error(
    tmp_path: Path, data: bytes, reason: str
) -> None:
    path = tmp_path / "echo.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as raised:
        load_service_config({}, {}, str(path))
    assert str(raised.value) == f"--config: {path} is not UTF-8 text {reason}"
    assert "\n" not in str(raised.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config: cannot read .*missing.toml: no such file"):
        read_config_file(str(tmp_path / "missing.toml"))
    if os.geteuid() != 0:  # root reads anything
        path = Path(write(tmp_path, "port = 1\n"))
        path.chmod(0)
        with pytest.raises(ConfigError, match="permission denied"):
            read_config_file(str(path))


def test_printed_config_reads_back_identically(tmp_path: Path) -> None:
    config = load_service_config(
        {"port": 4242, "host": "::1", "reuse_port": True, "metrics": "127.0.0.1:9100"},
        {"ECHO_ASYNC_IDLE_TIMEOUT": "2.5"},
    )
    path = write(tmp_path, render_toml(config))
    assert load_service_config({}, {}, path) == config


def test_any_text_survives_print_config(tmp_path: Path) -> None:
    config = load_service_config({"greeting": 'smile 😀 del\x7f tab\t quote" back\\'}, {})
    path = write(tmp_path, render_toml(config))
    assert load_service_config({}, {}, path) == config
