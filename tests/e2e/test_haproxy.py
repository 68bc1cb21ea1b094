"""A real HAProxy, configured from deploy/haproxy/haproxy.cfg, in front of two echo-async instances.

Everything runs on loopback. HAProxy's connections to the instances come from 127.0.0.2 (the
test adds `source 127.0.0.2`), and the instances trust only that address for PROXY headers, so
a `connection closed` record whose `peer` is the client's own 127.0.0.1 address and whose
`proxy` is 127.0.0.2 shows the header was sent, trusted and used.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import CliServer, start_cli_server, stop_cli_server, wait_until

pytestmark = pytest.mark.slow

DEPLOYED_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
PROXY_SOURCE = "127.0.0.2"  # where HAProxy's connections to the instances come from
DRAIN_DELAY_S = 1.0
SHUTDOWN_TIMEOUT_S = 3
# Fast checks for a short test; the deployed file checks every second (tests/test_deploy.py).
TEST_CHECKS = "default-server inter 200ms fastinter 100ms downinter 200ms fall 1 rise 1"
IO_TIMEOUT_S = 10.0
NO_HAPROXY = "haproxy is not installed (apt-get install haproxy); .ci/run installs it"
# A tcplog line: client [date] frontend backend/server Tw/Tc/Tt bytes termination
# actconn/feconn/beconn/srv_conn/retries queues; retries reads "+N" when a retry redispatched.
TCPLOG = re.compile(r"^\S+:\d+ \[[^]]+\] \S+ \S+/\S+ ")
REDISPATCHED = re.compile(r"/\+\d+ \d+/\d+$")


# -- the processes -------------------------------------------------------------------------------


@dataclass(eq=False)
class Backend:
    """One `echo-async serve` behind HAProxy."""

    process: CliServer
    port: int
    metrics_port: int

    @property
    def greeting(self) -> bytes:
        return f"backend-{self.port}".encode()

    def closed_records(self) -> dict[str, dict[str, Any]]:
        """`connection closed` records of proxied connections, by the client's `peer`."""
        return {
            record["peer"]: record
            for record in self.process.records()
            if record.get("event") == "connection closed" and "proxy" in record
        }


def start_backend(tmp_path: Path) -> Backend:
    process, port = start_cli_server(
        [
            "--metrics",
            "127.0.0.1:0",
            "--proxy-protocol",
            "required",
            "--proxy-trusted",
            f"{PROXY_SOURCE}/32",
            "--greeting",
            "backend-{port}",
            "--shutdown-timeout",
            str(SHUTDOWN_TIMEOUT_S),
            # The test's checks run every 200 ms: HAProxy sees the 503 well within this.
            "--drain-delay",
            str(DRAIN_DELAY_S),
        ],
        tmp_path,
    )
    metrics: list[int] = []

    def metrics_listening() -> bool:
        for record in process.records():
            if record.get("event") == "metrics listening":
                metrics.append(int(record["address"].rsplit(":", 1)[1].split("/", 1)[0]))
                return True
        return False

    wait_until(metrics_listening)
    return Backend(process, port, metrics[0])


@dataclass
class HAProxy:
    """A foreground `haproxy -db`; its log (option tcplog) goes to `log_path`."""

    process: subprocess.Popen[bytes]
    port: int
    admin_socket: Path
    log_path: Path

    def command(self, text: str) -> str:
        """One command on the runtime API (the `stats socket`), and its reply."""
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(IO_TIMEOUT_S)
            admin.connect(str(self.admin_socket))
            admin.sendall(text.encode() + b"\n")
            return read_to_eof(admin).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` of every server in the backend, by name: `status`, `scur` (sessions)..."""
        lines = self.command("show stat").splitlines()
        columns = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(columns, line.split(","), strict=False)) for line in lines[1:])
        return {
            row["svname"]: row
            for row in rows
            if row.get("svname") not in (None, "FRONTEND", "BACKEND")
        }

    def session_log(self) -> list[str]:
        """One tcplog line per finished session."""
        return [line for line in self.log_path.read_text().splitlines() if TCPLOG.match(line)]


def find_haproxy() -> str | None:
    """The haproxy command; Debian installs it in /usr/sbin, which a user's PATH may lack."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("haproxy", path=path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def render_config(
    template: str, port: int, admin_socket: Path, servers: list[tuple[str, int, int]]
) -> str:
    """The deployed configuration, pointed at loopback: bind, stats socket, servers, checks.

    Everything else (mode, timeouts, retries, redispatch, health check request) is used as
    deployed. Each rewrite must find its line, so a change to the file can't silently bypass one.
    """
    rendered: list[str] = []
    rewritten: Counter[str] = Counter()
    for line in template.splitlines():
        words = line.split()
        indent = line[: len(line) - len(line.lstrip())]
        if words[:1] == ["bind"]:
            line = f"{indent}bind 127.0.0.1:{port}"
        elif words[:1] == ["maxconn"]:
            line = f"{indent}maxconn 1000"  # the deployed value needs more descriptors
        elif words[:2] == ["stats", "socket"]:
            line = f"{indent}stats socket {admin_socket} mode 600 level admin"
        elif words[:1] == ["default-server"]:
            line = f"{indent}{TEST_CHECKS}\n{indent}source {PROXY_SOURCE}"
        elif words[:1] == ["server"]:
            if rewritten["server"] < len(servers):
                name, server_port, check_port = servers[rewritten["server"]]
                options = " ".join(words[3:])
                options = re.sub(r"\bport \d+", f"port {check_port}", options)
                line = f"{indent}server {name} 127.0.0.1:{server_port} {options}"
            else:
                line = ""
        else:
            rendered.append(line)
            continue
        rewritten[words[0]] += 1
        rendered.append(line)
    assert rewritten["bind"] == 1
    assert rewritten["maxconn"] == 1
    assert rewritten["stats"] == 1
    assert rewritten["default-server"] == 1
    assert rewritten["server"] >= len(servers)
    return "\n".join(rendered) + "\n"


def start_haproxy(
    haproxy: str, tmp_path: Path, servers: list[tuple[str, int, int]], *, check_up: bool = True
) -> HAProxy:
    port = free_port()
    admin_socket = tmp_path / "haproxy.sock"
    config_path = tmp_path / "haproxy.cfg"
    config_path.write_text(render_config(DEPLOYED_CONFIG.read_text(), port, admin_socket, servers))
    log_path = tmp_path / "haproxy.log"
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            [haproxy, "-db", "-f", str(config_path)], stdout=output, stderr=subprocess.STDOUT
        )
    proxy = HAProxy(process, port, admin_socket, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"haproxy exited {process.returncode}: {log_path.read_text()}")
        try:
            servers = proxy.servers()
        except (FileNotFoundError, ConnectionRefusedError):
            return False  # not listening yet
        # A server reads UP before its first check (check_status INI): wait for a passed check.
        return not check_up or all(
            row["status"] == "UP" and row["check_status"] == "L7OK" for row in servers.values()
        )

    wait_until(ready)
    return proxy


@pytest.fixture
def haproxy() -> str:
    found = find_haproxy()
    if found is None:
        pytest.skip(NO_HAPROXY)
    return found


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[list[Backend]]:
    started: list[Backend] = []
    try:
        for _ in range(2):
            started.append(start_backend(tmp_path))
        yield started
    finally:
        for backend in started:
            stop_cli_server(backend.process)


@pytest.fixture
def stop_later() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes to terminate (and wait for) after the test, whatever happens."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(IO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the clients ---------------------------------------------------------------------------------


def read_to_eof(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_greeting(connection: socket.socket) -> bytes:
    """The greeting line, without its newline; no echo can precede it (nothing was sent)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = connection.recv(1)
        if not chunk:
            raise ConnectionError(f"EOF before the greeting, after {line!r}")
        line += chunk
    return line[:-1]


def read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@dataclass
class Session:
    """One client connection through HAProxy: which instance greeted it, what came back."""

    sent: bytes
    client_port: int = 0
    greeting: bytes = b""
    echoed: bytes = b""
    error: str = ""
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float = 0.0


def echo_session(port: int, payload: bytes) -> Session:
    """Connect, read the greeting, send `payload` and half-close, read the echo to EOF.

    Whatever goes wrong (refused, reset, no greeting) ends up in `error`, never raised.
    """
    session = Session(payload)
    errors: list[str] = []

    def send(client: socket.socket) -> None:
        try:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
        except OSError as error:
            errors.append(f"sending: {error!r}")

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as client:
            session.client_port = client.getsockname()[1]
            session.greeting = read_greeting(client)
            # Read while sending: writing everything first can deadlock against backpressure.
            sender = threading.Thread(target=send, args=(client,))
            sender.start()
            try:
                session.echoed = read_to_eof(client)
            finally:
                sender.join(IO_TIMEOUT_S)
    except OSError as error:
        errors.append(repr(error))
    session.error = "; ".join(errors)
    session.finished_at = time.monotonic()
    return session


def payload(size: int) -> bytes:
    return random.randbytes(size)


class Churn:
    """Clients opening one connection after another through HAProxy, until the block ends."""

    def __init__(self, port: int, clients: int = 4) -> None:
        self.port = port
        self.sessions: list[Session] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sessions.append(echo_session(self.port, payload(random.randrange(1, 8192))))

    def finished_after(self, moment: float) -> int:
        return sum(session.finished_at > moment for session in list(self.sessions))

    def __enter__(self) -> Churn:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(IO_TIMEOUT_S * 2)


# -- the tests -----------------------------------------------------------------------------------


def test_haproxy_balances_with_proxy_protocol_and_survives_a_backend_drain(
    haproxy: str, backends: list[Backend], tmp_path: Path, stop_later: list[Any]
) -> None:
    servers = [(f"echo{index + 1}", b.port, b.metrics_port) for index, b in enumerate(backends)]
    proxy = start_haproxy(haproxy, tmp_path, servers)
    stop_later.append(proxy.process)
    by_greeting = {backend.greeting: backend for backend in backends}

    # 1. Every byte comes back through HAProxy; both instances serve; each logs the real client.
    with ThreadPoolExecutor(8) as pool:
        sizes = [1, 100, 65536, 300_000] + [random.randrange(1, 50_000) for _ in range(36)]
        sessions = list(pool.map(lambda size: echo_session(proxy.port, payload(size)), sizes))
    for session in sessions:
        assert not session.error, session
        assert session.greeting in by_greeting, session.greeting
        assert session.echoed == session.sent, f"{len(session.echoed)} of {len(session.sent)}"
    served = Counter(session.greeting for session in sessions)
    assert set(served) == set(by_greeting), served
    assert min(served.values()) >= len(sessions) // 4, served

    def every_session_logged() -> bool:
        return all(
            f"127.0.0.1:{session.client_port}" in by_greeting[session.greeting].closed_records()
            for session in sessions
        )

    wait_until(every_session_logged)
    for session in sessions:
        record = by_greeting[session.greeting].closed_records()[f"127.0.0.1:{session.client_port}"]
        assert record["proxy"].startswith(f"{PROXY_SOURCE}:"), record
        assert record["bytes_in"] == record["bytes_out"] == len(session.sent), record
        assert record["reason"] == "eof", record

    # 2. SIGTERM one instance while clients keep coming; nobody loses a byte.
    victim, survivor = backends
    held: list[tuple[socket.socket, Backend, int]] = []
    try:
        while {backend for _, backend, _ in held} != set(backends) or len(held) < 6:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT_S)
            held.append((client, by_greeting[read_greeting(client)], client.getsockname()[1]))
            message = payload(8192)
            client.sendall(message)
            assert read_exactly(client, len(message)) == message

        with Churn(proxy.port) as churn:
            wait_until(lambda: len(churn.sessions) >= 20)
            victim.process.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()

            # Held connections on the victim: everything they sent came back, then a clean EOF.
            for client, backend, _ in held:
                if backend is victim:
                    assert read_to_eof(client) == b""
                    client.close()
            assert victim.process.wait(DRAIN_DELAY_S + SHUTDOWN_TIMEOUT_S + IO_TIMEOUT_S) == 0
            exited_at = time.monotonic()
            wait_until(lambda: proxy.servers()["echo1"]["status"] != "UP")
            down_at = time.monotonic()
            wait_until(lambda: churn.finished_after(down_at) >= 20)

        # Held connections on the survivor never noticed.
        for client, backend, _ in held:
            if backend is survivor:
                message = payload(8192)
                client.sendall(message)
                assert read_exactly(client, len(message)) == message
    finally:
        for client, _, _ in held:
            client.close()

    victim_records = victim.closed_records()
    for _, backend, client_port in held:
        if backend is victim:
            record = victim_records[f"127.0.0.1:{client_port}"]
            assert record["reason"] == "shutdown", record
            assert record["bytes_in"] == record["bytes_out"] == 8192, record

    # Each churning client got its greeting and every byte back, except a client the victim was
    # serving when the drain began: it got back exactly what the victim had read, then EOF.
    truncated = 0
    for session in churn.sessions:
        assert not session.error, session
        assert session.greeting in by_greeting, session
        if session.echoed != session.sent:
            truncated += 1
            assert by_greeting[session.greeting] is victim, session
            assert session.sent.startswith(session.echoed), session
            record = victim_records[f"127.0.0.1:{session.client_port}"]
            assert record["reason"] == "shutdown", record
            assert record["bytes_out"] == len(session.echoed), record
        if session.started_at > exited_at:
            assert session.greeting == survivor.greeting, session

    after_down = [s for s in churn.sessions if s.started_at > down_at]
    redispatched = [line for line in proxy.session_log() if REDISPATCHED.search(line)]
    print(
        f"churn: {len(churn.sessions)} sessions, {truncated} cut short by the drain, "
        f"{len(after_down)} after the check marked echo1 down "
        f"({down_at - stopped_at:.3f} s after SIGTERM, {exited_at - stopped_at:.3f} s to exit); "
        f"HAProxy redispatched {len(redispatched)}"
    )


def test_haproxy_retries_a_refused_connection_on_another_server(
    haproxy: str, tmp_path: Path, stop_later: list[Any]
) -> None:
    """What covers the gap before a check notices: a refused connect goes to another server."""
    survivor = start_backend(tmp_path)
    stop_later.append(survivor.process)
    refusing_port = free_port()  # nothing listens there
    config_servers = [
        ("echo1", refusing_port, survivor.metrics_port),  # its check says UP: it's the survivor's
        ("echo2", survivor.port, survivor.metrics_port),
    ]
    proxy = start_haproxy(haproxy, tmp_path, config_servers)
    stop_later.append(proxy.process)

    started = time.monotonic()
    sessions = [echo_session(proxy.port, payload(1000)) for _ in range(10)]
    elapsed = time.monotonic() - started
    for session in sessions:
        assert not session.error, session
        assert session.greeting == survivor.greeting
        assert session.echoed == session.sent

    wait_until(lambda: len(proxy.session_log()) >= len(sessions))
    retried = [line for line in proxy.session_log() if REDISPATCHED.search(line)]
    assert len(retried) >= len(sessions) // 2 - 1, proxy.session_log()
    # Redispatching on the first retry ("option redispatch 1") skips HAProxy's 1 s turn-around.
    assert elapsed < 5, elapsed


def test_haproxy_runtime_drain_before_sigterm_cuts_no_connection(
    haproxy: str, backends: list[Backend], tmp_path: Path, stop_later: list[Any]
) -> None:
    """Planned maintenance: drain the server in HAProxy first, then stop the instance."""
    servers = [(f"echo{index + 1}", b.port, b.metrics_port) for index, b in enumerate(backends)]
    proxy = start_haproxy(haproxy, tmp_path, servers)
    stop_later.append(proxy.process)
    victim, survivor = backends

    with Churn(proxy.port) as churn:
        wait_until(lambda: len(churn.sessions) >= 20)
        assert proxy.command("set server echo_async/echo1 state drain").strip() == ""
        drained_at = time.monotonic()
        wait_until(lambda: proxy.servers()["echo1"]["scur"] == "0")
        victim.process.send_signal(signal.SIGTERM)
        assert victim.process.wait(SHUTDOWN_TIMEOUT_S + IO_TIMEOUT_S) == 0
        exited_at = time.monotonic()
        wait_until(lambda: churn.finished_after(exited_at) >= 20)

    greeted = Counter(session.greeting for session in churn.sessions)
    assert greeted[victim.greeting] > 0, greeted
    for session in churn.sessions:
        assert not session.error, session
        assert session.echoed == session.sent, session  # not even cut short
        if session.started_at > drained_at:
            assert session.greeting == survivor.greeting, session
    reasons = Counter(record["reason"] for record in victim.closed_records().values())
    assert set(reasons) == {"eof"}, reasons
