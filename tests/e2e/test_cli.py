"""The installed `echo-async serve` command, driven as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    cli_command,
    echo,
    stalled_client,
    start_cli_server,
    stop_cli_server,
    wait_until,
)

CLOSE_FIELDS = {"peer", "local", "bytes_in", "bytes_out", "duration_s", "reason"}


def test_serves_logs_json_records_and_exits_zero_on_sigterm_with_clients(tmp_path: Path) -> None:
    process, port = start_cli_server([], tmp_path)
    try:
        payload = os.urandom(100_000)
        assert echo(port, payload) == payload
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for client in idle:
            client.sendall(b"ping")
            assert client.recv(10) == b"ping"
    finally:
        status = stop_cli_server(process)
    assert status == 0
    records = process.records()
    closed = [r for r in records if r["event"] == "connection closed"]
    assert len(closed) == 4
    for record in closed:
        assert set(record) >= CLOSE_FIELDS
        assert record["level"] == "info"
    assert closed[0]["reason"] == "eof"
    assert closed[0]["bytes_in"] == closed[0]["bytes_out"] == 100_000
    assert sorted(r["reason"] for r in closed[1:]) == ["shutdown"] * 3
    for client in idle:
        assert client.recv(10) == b""  # a clean EOF, not a reset
        client.close()
    summary = next(r for r in records if r["event"] == "server closed")
    assert summary["connections_total"] == 4
    assert summary["bytes_in"] == 100_000 + 3 * 4


def test_second_sigint_aborts_a_stuck_drain(tmp_path: Path) -> None:
    process, port = start_cli_server(["--shutdown-timeout", "60"], tmp_path)
    hog = stalled_client(port)
    try:
        process.send_signal(signal.SIGINT)
        wait_until(lambda: any(r["event"] == "shutting down" for r in process.records()))
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 130
    finally:
        hog.close()
        if process.poll() is None:
            process.kill()
    closed = [r for r in process.records() if r["event"] == "connection closed"]
    assert [r["reason"] for r in closed] == ["shutdown"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--port", "70000"], "--port: 70000 is out of range 0..65535"),
        (["--port", "-1"], "--port: -1 is out of range"),
        (["--port", "http"], "argument --port: invalid int value: 'http'"),
        (["--shutdown-timeout", "-3"], "--shutdown-timeout"),
        (["--loop", "trio"], "argument --loop: invalid choice: 'trio'"),
        (["--log-level", "loud"], "argument --log-level: invalid choice"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--host", "no-such-host.invalid"], "cannot listen on no-such-host.invalid:"),
        # subprocess passes a lone surrogate as the byte it escapes: argv holds caf\xe9.
        (["--greeting", "caf\udce9", "--print-config"], "--greeting: not valid UTF-8 text"),
        (["--listen", "unix:///tmp/\udce9.sock", "--print-config"], "--listen: not valid UTF-8"),
        (
            ["--listen", "unix:///tmp/" + "x" * 200],
            "the path is too long for a Unix socket (205 bytes; the limit is ",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(arguments: list[str], message: str) -> None:
    result = subprocess.run(
        [*cli_command(), "serve", *arguments], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_busy_port_exits_2_with_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [*cli_command(), "serve", "--port", str(port), "--log-format", "json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"echo-async serve: error: cannot listen on 127.0.0.1:{port}: address already in use"
    )


def test_no_command_is_a_usage_error() -> None:
    result = subprocess.run(cli_command(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "required" in result.stderr


def test_python_dash_m_runs_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "echo_async", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("echo-async ")


def test_asyncio_loop_when_asked(tmp_path: Path) -> None:
    process, port = start_cli_server(["--loop", "asyncio"], tmp_path)
    try:
        assert echo(port, b"abc") == b"abc"
    finally:
        assert stop_cli_server(process) == 0
    serving = next(r for r in process.records() if r["event"] == "serving")
    assert serving["loop"] == "asyncio"


def test_several_listeners_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "cli.sock"
    process, port = start_cli_server(
        [
            "--listen",
            "tcp://127.0.0.1:0",
            "--listen",
            "udp://127.0.0.1:0",
            "--listen",
            f"unix://{path}",
        ],
        tmp_path,
    )
    try:
        listening = next(r for r in process.records() if r["event"] == "listening")
        _tcp_url, udp_url, unix_url = listening["addresses"]
        assert unix_url == f"unix://{path}"
        assert echo(port, b"over tcp") == b"over tcp"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            client.sendall(b"over unix")
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b"over unix"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"over udp", ("127.0.0.1", int(udp_url.rsplit(":", 1)[1])))
            assert client.recv(100) == b"over udp"
    finally:
        assert stop_cli_server(process) == 0
    assert not path.exists()


def test_bad_listener_url_exits_2() -> None:
    result = subprocess.run(
        [*cli_command(), "serve", "--listen", "sctp://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("echo-async serve: error: --listen: 'sctp://127.0.0.1:1'")


def test_busy_port_among_several_listeners_names_that_listener() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        result = subprocess.run(
            [*cli_command(), "serve", "--listen", "udp://127.0.0.1:0", "--listen", busy],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"echo-async serve: error: cannot listen on {busy}: address already in use"
    )


@pytest.mark.parametrize("arguments", [["--print-config"], ["--workers", "2"]])
def test_environment_text_that_is_not_utf8_exits_2(arguments: list[str]) -> None:
    result = subprocess.run(
        [*cli_command(), "serve", "--port", "0", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "ECHO_ASYNC_GREETING": "caf\udce9"},  # the byte 0xe9 in environ
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "echo-async serve: error: ECHO_ASYNC_GREETING: not valid UTF-8 text: 'caf\\udce9'"
    ]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'greeting = "caf\xe9"\n', "byte 0xe9 on line 1"),
        ("port = 1\n".encode("utf-16"), "it is UTF-16; save it as UTF-8"),
    ],
)
def test_config_file_that_is_not_utf8_exits_2(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "echo.toml"
    path.write_bytes(data)
    result = subprocess.run(
        [*cli_command(), "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"echo-async serve: error: --config: {path} is not UTF-8 text ({reason})"
    ]


def test_help_shows_what_listen_defaults_to() -> None:
    result = subprocess.run(
        [*cli_command(), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # undo argparse's wrapping
    assert "(default: ()" not in text
    assert "(default: tcp://HOST:PORT from --host/--port; env ECHO_ASYNC_LISTEN)" in text
