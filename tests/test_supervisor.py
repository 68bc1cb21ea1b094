"""`echo-async serve --workers N`: the supervisor, its workers on one port, their summed metrics."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from echo_async.config import ServerConfig, ServiceConfig
from echo_async.service import MULTIPROCESS_DIRECTORY
from echo_async.supervisor import (
    MAX_RESTARTS,
    RESTART_WINDOW_S,
    WORKER_ENVIRONMENT_VARIABLE,
    RestartBudget,
    Supervisor,
    reserve_port,
    worker_environment,
)
from tests.conftest import wait_for
from tests.e2e.helpers import (
    CliServer,
    cli_command,
    echo,
    stalled_client,
    start_cli_server,
    stop_cli_server,
    wait_until,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="--workers needs Linux")

Record = dict[str, Any]


@pytest.fixture
def supervisors() -> Iterator[list[CliServer]]:
    """Supervisors a test started; any still running at the end are stopped, workers killed."""
    started: list[CliServer] = []
    yield started
    for process in started:
        if process.poll() is None:  # the test failed: still drain, so the temp dir goes too
            with contextlib.suppress(AssertionError):
                stop_cli_server(process, timeout=20)
        for pid in worker_pids(process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_supervisor(
    supervisors: list[CliServer], tmp_path: Path, *extra: str
) -> tuple[CliServer, int]:
    process, port = start_cli_server(["--workers", "2", *extra], tmp_path)
    supervisors.append(process)
    wait_for_record(process, lambda r: r["event"] == "workers ready")
    return process, port


def wait_for_record(process: CliServer, predicate: Callable[[Record], bool]) -> Record:
    found: list[Record] = []

    def seen() -> bool:
        found[:] = [r for r in process.records() if predicate(r)]
        return bool(found) or process.poll() is not None

    wait_until(seen, timeout=20)
    assert found, f"supervisor exited {process.returncode} before the record appeared"
    return found[0]


def worker_pids(process: CliServer) -> list[int]:
    started = ("worker started", "worker restarted")
    return [r["pid"] for r in process.records() if r["event"] in started]


def metrics_port(process: CliServer) -> int:
    record = wait_for_record(process, lambda r: r["event"] == "metrics listening")
    return int(record["address"].rsplit(":", 1)[1].split("/", 1)[0])


def scrape(port: int) -> dict[str, float]:
    """Each sample name of /metrics with its values summed over every label set."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    sums: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] += sample.value
    return sums


def wait_for_metrics(port: int, expected: dict[str, float]) -> None:
    """Poll /metrics until it shows `expected` (workers copy their counters once a second)."""
    last: dict[str, float] = {}

    def matches() -> bool:
        last.clear()
        last.update(scrape(port))
        return all(last.get(name, 0.0) == value for name, value in expected.items())

    try:
        wait_until(matches, timeout=10)
    except AssertionError:
        shown = {name: last.get(name, 0.0) for name in expected}
        raise AssertionError(f"/metrics {shown} never matched {expected}") from None


def connect_and_echo(port: int, count: int) -> list[socket.socket]:
    """`count` open connections, each having echoed one byte (so a worker has accepted it)."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        clients.append(client)
        client.sendall(b"x")
        assert client.recv(1) == b"x"
    return clients


def connections_by_worker(pids: list[int], port: int) -> dict[int, int]:
    """How many established connections to `port` each process holds (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in pids:
        directory = Path(f"/proc/{pid}/fd")
        links = [os.readlink(fd) for fd in directory.iterdir()]
        counts[pid] = sum(link in inodes for link in links)
    return counts


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def listening_socket(port: int, *options: int) -> socket.socket:
    """A socket listening on 127.0.0.1:`port` with these SOL_SOCKET options set, as a program's."""
    sock = socket.socket()
    try:
        for option in options:
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


def http_status(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return int(response.status)


def test_workers_share_the_port_a_killed_one_is_restarted_and_sigterm_drains_all(
    tmp_path: Path, supervisors: list[CliServer]
) -> None:
    process, port = start_supervisor(
        supervisors, tmp_path, "--metrics", "127.0.0.1:0", "--shutdown-timeout", "5"
    )
    metrics = metrics_port(process)
    first = worker_pids(process)
    assert len(first) == 2
    assert http_status(metrics, "/healthz") == 200

    clients = connect_and_echo(port, 40)
    spread = connections_by_worker(first, port)
    for client in clients:
        client.close()
    assert sum(spread.values()) == 40
    assert all(spread.values()), spread  # the kernel gave both workers some
    payload = os.urandom(1_000_000)
    assert echo(port, payload) == payload
    connections, received = 41, 40 + len(payload)
    wait_for_metrics(
        metrics,
        {
            "echo_connections_total": connections,
            "echo_bytes_received_total": received,
            "echo_bytes_sent_total": received,
            "echo_connections_active": 0,
        },
    )

    os.kill(first[0], signal.SIGKILL)
    restarted = wait_for_record(process, lambda r: r["event"] == "worker restarted")
    assert restarted["index"] == 0
    assert restarted["pid"] not in first
    wait_for_record(
        process, lambda r: r["event"] == "worker ready" and r["pid"] == restarted["pid"]
    )
    died = wait_for_record(process, lambda r: r["event"] == "worker exited")
    assert (died["pid"], died["signal"], died["level"]) == (first[0], "SIGKILL", "warning")
    assert not is_running(first[0])

    second = [restarted["pid"], first[1]]
    held = connect_and_echo(port, 40)
    try:
        spread = connections_by_worker(second, port)
        assert sum(spread.values()) == 40
        assert all(spread.values()), spread
        # The killed worker's counts survive it; the live gauge sums the live workers only.
        wait_for_metrics(
            metrics,
            {
                "echo_connections_total": connections + 40,
                "echo_bytes_received_total": received + 40,
                "echo_connections_active": 40,
            },
        )
        assert stop_cli_server(process) == 0
        for client in held:
            assert client.recv(10) == b""  # drained: a clean EOF, not a reset
    finally:
        for client in held:
            client.close()
    exits = [r for r in process.records() if r["event"] == "worker exited"][1:]
    assert sorted((r["pid"], r["status"]) for r in exits) == sorted((pid, 0) for pid in second)
    wait_until(lambda: not any(is_running(pid) for pid in worker_pids(process)))


def test_second_sigint_makes_the_workers_abort_a_stuck_drain(
    tmp_path: Path, supervisors: list[CliServer]
) -> None:
    process, port = start_supervisor(supervisors, tmp_path, "--shutdown-timeout", "60")
    hog = stalled_client(port)
    try:
        process.send_signal(signal.SIGINT)
        wait_for_record(process, lambda r: r["event"] == "shutting down")
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 130
    finally:
        hog.close()
    assert not any(is_running(pid) for pid in worker_pids(process))


def test_a_second_sigterm_ends_the_workers_drain_delay(
    tmp_path: Path, supervisors: list[CliServer]
) -> None:
    # As with one process (tests/e2e/test_operations.py), a second signal ends --drain-delay.
    process, port = start_supervisor(supervisors, tmp_path, "--drain-delay", "60")
    process.send_signal(signal.SIGTERM)
    delaying = "failing health checks before closing"
    wait_until(lambda: sum(r["event"] == delaying for r in process.records()) == 2, timeout=20)
    assert echo(port, b"still served") == b"still served"
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert not any(is_running(pid) for pid in worker_pids(process))


def test_a_worker_that_keeps_dying_stops_the_supervisor_with_status_1(
    tmp_path: Path, supervisors: list[CliServer]
) -> None:
    process, _ = start_supervisor(supervisors, tmp_path)
    killed: set[int] = set()
    for _ in range(MAX_RESTARTS + 1):
        pid = next(r["pid"] for r in reversed(process.records()) if r.get("index") == 0)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        wait_for_record(
            process,
            lambda r: (
                r["event"] in ("worker restarted", "worker keeps dying, stopping")
                and r.get("pid") not in killed
            ),
        )
    assert process.wait(15) == 1
    records = process.records()
    assert sum(r["event"] == "worker restarted" for r in records) == MAX_RESTARTS
    assert any(r["event"] == "worker keeps dying, stopping" for r in records)
    assert not any(is_running(pid) for pid in worker_pids(process))


@pytest.mark.parametrize("busy", ["--port", "--metrics"])
def test_a_busy_address_is_one_line_and_exit_2_before_any_worker(busy: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        where = f"127.0.0.1:{taken}"
        command = [*cli_command(), "serve", "--workers", "2", "--log-format", "json"]
        if busy == "--port":
            command += ["--port", str(taken), "--metrics", "127.0.0.1:0"]
        else:
            command += ["--port", "0", "--metrics", where]
        result = subprocess.run(command, capture_output=True, timeout=30, check=False)
    assert result.returncode == 2
    expected = {
        "--port": f"echo-async serve: error: cannot listen on {where}: address already in use",
        "--metrics": f"echo-async serve: error: --metrics: cannot listen on {where}: "
        "address already in use",
    }[busy]
    assert result.stderr.decode().splitlines() == [expected]
    assert b"worker started" not in result.stdout


def test_metrics_on_the_echo_port_is_one_line_and_exit_2_before_any_worker() -> None:
    # The reservation once let the metrics endpoint (SO_REUSEADDR) listen on the echo port;
    # every worker then died with "address already in use" and the supervisor exited 1.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    where = f"127.0.0.1:{port}"
    command = [*cli_command(), "serve", "--workers", "2", "--log-format", "json"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--metrics", where]
    result = subprocess.run(command, capture_output=True, timeout=30, check=False)
    assert result.stderr.decode().splitlines() == [
        f"echo-async serve: error: --metrics: cannot listen on {where}: address already in use"
    ]
    assert result.returncode == 2
    assert b"worker started" not in result.stdout


def test_no_other_program_takes_the_port_while_no_worker_listens(
    tmp_path: Path, supervisors: list[CliServer]
) -> None:
    process, port = start_supervisor(supervisors, tmp_path, "--host", "127.0.0.1")
    first = worker_pids(process)
    process.send_signal(signal.SIGSTOP)  # holds the restarts: only the reservation is left
    try:
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(is_running(pid) for pid in first))
        with pytest.raises(OSError, match="in use"):
            listening_socket(port, socket.SO_REUSEADDR).close()
    finally:
        process.send_signal(signal.SIGCONT)
    restarted = ("worker restarted", "worker ready")
    wait_until(lambda: sum(r["event"] in restarted for r in process.records()) == 6, timeout=20)
    assert echo(port, b"still ours") == b"still ours"
    assert stop_cli_server(process) == 0


@pytest.mark.parametrize(
    "options",
    [(), (socket.SO_REUSEADDR,), (socket.SO_REUSEADDR, socket.SO_REUSEPORT)],
    ids=["plain", "SO_REUSEADDR", "both"],
)
def test_reserved_port_takes_no_connections_but_keeps_the_port(options: tuple[int, ...]) -> None:
    (probe,) = reserve_port(ServerConfig(host="127.0.0.1", port=0))
    with probe:
        port = probe.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        if socket.SO_REUSEPORT not in options:
            with pytest.raises(OSError, match="in use"):
                listening_socket(port, *options).close()
        else:  # as a worker does: it listens beside the reservation, and gets the connections
            with (
                listening_socket(port, *options) as worker,
                socket.create_connection(("127.0.0.1", port), timeout=5),
            ):
                worker.accept()[0].close()


def test_a_previous_supervisors_closed_connections_dont_keep_the_port_reserved() -> None:
    # Without SO_REUSEADDR the reservation can't bind over TIME_WAIT connections of a server
    # without SO_REUSEPORT (docs/workers.md says so); a worker's have it, so a restart works.
    with listening_socket(0, socket.SO_REUSEADDR, socket.SO_REUSEPORT) as worker:
        port = worker.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            worker.accept()[0].close()  # the server closes first: TIME_WAIT on its side
            assert client.recv(1) == b""
    (reservation,) = reserve_port(ServerConfig(host="127.0.0.1", port=port))
    reservation.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_another_user_cannot_take_the_reserved_port() -> None:
    attempts = [
        (socket.SO_REUSEADDR,),
        (socket.SO_REUSEPORT,),
        (socket.SO_REUSEADDR, socket.SO_REUSEPORT),
    ]
    # A separate program running as nobody (not a fork of this multi-threaded process), with
    # the system's Python: nobody may not reach this one (under /root with pyenv).
    interpreter = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    program = (
        "import socket, sys\n"
        "taken = 0\n"
        "for bit, options in enumerate(eval(sys.argv[2])):\n"
        "    sock = socket.socket()\n"
        "    try:\n"
        "        for option in options:\n"
        "            sock.setsockopt(socket.SOL_SOCKET, option, 1)\n"
        "        sock.bind(('127.0.0.1', int(sys.argv[1])))\n"
        "        sock.listen()\n"
        "        taken |= 1 << bit\n"
        "    except OSError:\n"
        "        pass\n"
        "    finally:\n"
        "        sock.close()\n"
        "print(taken)\n"
    )
    (reservation,) = reserve_port(ServerConfig(host="127.0.0.1", port=0))
    with reservation:
        port = reservation.getsockname()[1]
        done = subprocess.run(
            [interpreter, "-c", program, str(port), repr(attempts)],
            user=65534,  # nobody
            group=65534,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    taken = int(done.stdout)
    assert [options for bit, options in enumerate(attempts) if taken & 1 << bit] == []


def test_a_slot_that_cannot_wait_on_a_pidfd_polls_restarts_and_drains_its_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[Record]
) -> None:
    # As pidfd_open fails when the supervisor is out of file descriptors (EMFILE): the slot
    # once died with it, leaving its worker unwatched, never restarted, SIGKILLed at shutdown.
    def out_of_descriptors(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pidfd_open", out_of_descriptors)
    (reservation,) = reserve_port(ServerConfig(host="127.0.0.1", port=0))
    port = reservation.getsockname()[1]
    server = ServerConfig(host="127.0.0.1", port=port, shutdown_timeout=5)
    service = ServiceConfig(server=server, workers=2, log_format="json")

    def ready_pids() -> list[int]:
        return [r["pid"] for r in logs if r["event"] == "worker ready"]

    async def scenario() -> int:
        supervisor = Supervisor(service, port, tmp_path)
        running = asyncio.create_task(supervisor.run())
        await wait_for(lambda: len(ready_pids()) == 2, timeout=20)
        os.kill(ready_pids()[0], signal.SIGKILL)
        await wait_for(lambda: len(ready_pids()) == 3, timeout=20)
        assert echo(port, b"restarted") == b"restarted"
        supervisor._on_signal(signal.SIGTERM)
        return await asyncio.wait_for(running, 30)

    with reservation:
        assert asyncio.run(scenario()) == 0
    fallbacks = [
        r for r in logs if r["event"] == "cannot wait on a worker's pidfd, polling instead"
    ]
    assert sorted(r["index"] for r in fallbacks) == [0, 1]  # once per slot, not per wait
    assert all(r["error"] == "too many open files" for r in fallbacks)
    exits = [(r["pid"], r["status"]) for r in logs if r["event"] == "worker exited"]
    first, second, restarted = ready_pids()
    assert sorted(exits) == sorted([(first, -signal.SIGKILL), (second, 0), (restarted, 0)])


def test_worker_environment_drops_echo_async_and_systemd_variables() -> None:
    environ = {
        "PATH": "/bin",
        "ECHO_ASYNC_PORT": "1",
        "ECHO_ASYNC_CONFIG": "x.toml",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "LISTEN_FDS": "1",
        MULTIPROCESS_DIRECTORY: "/elsewhere",
    }
    assert worker_environment(environ, 3, "/tmp/n", "/tmp/m") == {
        "PATH": "/bin",
        WORKER_ENVIRONMENT_VARIABLE: "3",
        "NOTIFY_SOCKET": "/tmp/n",
        MULTIPROCESS_DIRECTORY: "/tmp/m",
    }
    assert MULTIPROCESS_DIRECTORY not in worker_environment(environ, 0, "/tmp/n", None)


def test_restart_budget_backs_off_then_gives_up_until_the_window_passes() -> None:
    budget = RestartBudget()
    delays = [budget.next_delay(100.0 + i) for i in range(MAX_RESTARTS)]
    assert delays == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.5])
    assert budget.next_delay(100.0 + MAX_RESTARTS) is None
    assert budget.next_delay(100.0 + MAX_RESTARTS + RESTART_WINDOW_S) is not None
