"""Operating the installed command: env and TOML config, metrics, systemd, out of descriptors."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    cli_command,
    echo,
    read_records,
    start_cli_server,
    stop_cli_server,
    wait_until,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_print_config_merges_flags_environment_and_file(tmp_path: Path) -> None:
    config_file = tmp_path / "echo.toml"
    config_file.write_text("port = 1111\nbacklog = 11\nmax_bytes = 5\n")
    result = subprocess.run(
        [*cli_command(), "serve", "--config", str(config_file), "--port", "3333", "--print-config"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "ECHO_ASYNC_BACKLOG": "22", "ECHO_ASYNC_PORT": "2222"},
    )
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.splitlines())
    assert {"port = 3333", "backlog = 22", "max_bytes = 5", 'host = "127.0.0.1"'} <= lines


@pytest.mark.parametrize(
    ("arguments", "environ", "message"),
    [
        ([], {"ECHO_ASYNC_IDLE_TIMEOUT": "-1"}, "ECHO_ASYNC_IDLE_TIMEOUT: -1.0 is not"),
        (["--config", "/nonexistent/echo.toml"], {}, "--config: cannot read /nonexistent"),
        (["--metrics", "localhost"], {}, "--metrics: expected HOST:PORT"),
    ],
)
def test_invalid_configuration_exits_2_before_starting(
    arguments: list[str], environ: dict[str, str], message: str
) -> None:
    result = subprocess.run(
        [*cli_command(), "serve", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **environ},
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""  # nothing started, nothing logged


def test_metrics_endpoint_reports_the_traffic_and_health(tmp_path: Path) -> None:
    metrics_port = free_port()
    process, port = start_cli_server(["--metrics", f"127.0.0.1:{metrics_port}"], tmp_path)
    try:
        for size in (10, 20_000):
            assert echo(port, b"m" * size) == b"m" * size
        url = f"http://127.0.0.1:{metrics_port}"

        def scraped() -> str:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
                return str(response.read().decode())

        wait_until(lambda: 'echo_bytes_received_total{transport="tcp"} 20010.0' in scraped())
        text = scraped()
        assert 'echo_connections_total{transport="tcp"} 2.0' in text
        assert 'echo_bytes_sent_total{transport="tcp"} 20010.0' in text
        with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
            assert response.status == 200
    finally:
        assert stop_cli_server(process) == 0


def health(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_drain_delay_fails_health_checks_but_keeps_serving_until_it_ends(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    process, port = start_cli_server(
        ["--metrics", f"127.0.0.1:{metrics_port}", "--drain-delay", "3"], tmp_path
    )
    url = f"http://127.0.0.1:{metrics_port}"
    try:
        assert health(url) == 200
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: health(url) == 503)
        # Within the delay a new connection is still accepted and served in full.
        assert echo(port, b"late but served") == b"late but served"
        assert process.wait(15) == 0
        assert time.monotonic() - signalled >= 3
    finally:
        stop_cli_server(process)
    events = [record["event"] for record in process.records()]
    assert events.index("failing health checks before closing") < events.index("exiting")


def test_a_second_signal_cuts_the_drain_delay_short(tmp_path: Path) -> None:
    process, port = start_cli_server(["--drain-delay", "60"], tmp_path)
    try:
        process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: any(
                r["event"] == "failing health checks before closing" for r in process.records()
            )
        )
        assert echo(port, b"still here") == b"still here"
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        stop_cli_server(process)


def test_busy_metrics_port_exits_2_and_closes_the_echo_port() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        port = free_port()
        result = subprocess.run(
            [*cli_command(), "serve", "--port", str(port), "--metrics", f"127.0.0.1:{busy}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("address already in use")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_systemd_notify_ready_and_stopping(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(notify_path)
        receiver.settimeout(15)
        os.environ["NOTIFY_SOCKET"] = notify_path
        try:
            process, port = start_cli_server([], tmp_path)
        finally:
            del os.environ["NOTIFY_SOCKET"]
        try:
            assert receiver.recv(100) == b"READY=1"
            assert echo(port, b"ready") == b"ready"
        finally:
            assert stop_cli_server(process) == 0
        assert receiver.recv(100) == b"STOPPING=1"


def test_socket_activation_serves_the_inherited_socket(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    log_path = tmp_path / "activated.jsonl"
    # As systemd does: the socket is fd 3 and LISTEN_PID is the service's own pid (exec keeps it).
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
        "os.execvp(sys.argv[2], sys.argv[2:])"
    )
    command = [*cli_command(), "serve", "--port", "1", "--log-format", "json"]
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(listener.fileno()), *command],
            pass_fds=(listener.fileno(),),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    listener.close()
    try:
        wait_until(lambda: any(r.get("event") == "listening" for r in read_records(log_path)), 15)
        listening = next(r for r in read_records(log_path) if r["event"] == "listening")
        assert listening["addresses"] == [f"tcp://127.0.0.1:{port}"]  # not port 1
        assert echo(port, b"activated") == b"activated"
    finally:
        assert stop_cli_server(process) == 0


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_out_of_file_descriptors_neither_kills_nor_spins(tmp_path: Path, loop: str) -> None:
    limit = 48

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    port = free_port()
    log_path = tmp_path / f"emfile-{loop}.jsonl"
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            [*cli_command(), "serve", "--port", str(port), "--loop", loop, "--log-format", "json"],
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=lower_limit,
        )
    clients: list[socket.socket] = []
    try:
        wait_until(lambda: any(r["event"] == "listening" for r in read_records(log_path)), 15)
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        first.sendall(b"1")
        assert first.recv(1) == b"1"
        for _ in range(3 * limit):  # far more than the server can hold
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            clients.append(client)

        def warned() -> bool:
            return any(
                r["event"].startswith("out of file descriptors") for r in read_records(log_path)
            )

        wait_until(warned, 15)
        cpu_before = _cpu_seconds(process.pid)
        time.sleep(1.0)  # measuring CPU use over a wall-clock second, not synchronising
        assert _cpu_seconds(process.pid) - cpu_before < 0.5, "the server spins"
        first.sendall(b"2")  # an open connection is still served
        assert first.recv(1) == b"2"
        for client in clients:
            client.close()
        clients.clear()
        wait_until(
            lambda: any(
                r["event"].startswith("file descriptors available") for r in read_records(log_path)
            ),
            15,
        )
        assert echo(port, b"after") == b"after"
        first.close()
    finally:
        for client in clients:
            client.close()
        assert stop_cli_server(process) == 0
    records = read_records(log_path)
    assert sum(r["event"].startswith("out of file descriptors") for r in records) == 1
    assert not [r for r in records if r.get("level") == "error"]
    assert "Traceback" not in log_path.read_text()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_json_lines_are_valid_json(tmp_path: Path) -> None:
    process, port = start_cli_server(["--log-level", "debug"], tmp_path)
    try:
        assert echo(port, b"x") == b"x"
    finally:
        stop_cli_server(process)
    for line in process.log_path.read_text().splitlines():
        json.loads(line)
    assert any(r["event"] == "connection opened" for r in process.records())


def test_a_workers_records_say_which_worker(tmp_path: Path) -> None:
    os.environ["ECHO_ASYNC_WORKER"] = "3"
    try:
        process, port = start_cli_server([], tmp_path)
    finally:
        del os.environ["ECHO_ASYNC_WORKER"]
    try:
        assert echo(port, b"w") == b"w"
    finally:
        assert stop_cli_server(process) == 0
    records = process.records()
    assert {record.get("worker") for record in records} == {3}
