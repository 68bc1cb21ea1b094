"""examples/locustfile.py under the real `locust`: a master and two worker processes, on loopback.

Locust monkey-patches the process that imports it, so it only ever runs in subprocesses here;
`importlib.util.find_spec` looks for it without importing it. Runs that do not depend on each
other go side by side: most of each one's time is Locust starting up.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import itertools
import json
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import start_cli_server, stop_cli_server

needs_locust = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="needs pip install 'echo-async[locust]'"
)

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "examples" / "locustfile.py"

# Locust's --run-time can start counting before its startup is over (gevent's clock is stale
# after the imports), which on a busy machine eats a second or two of a short run.
RUN_TIME = "--run-time=4s"

# Loaded by the master beside the example: what each worker reported, from Locust's own
# worker_report event (the CSV files hold only the merged totals).
PER_WORKER = """
import json, os
from locust import events

reported = {}

@events.worker_report.add_listener
def _count(client_id, data, **kwargs):
    totals = reported.setdefault(client_id, {"requests": 0, "failures": 0})
    for entry in data["stats"]:
        totals["requests"] += entry["num_requests"]
        totals["failures"] += entry["num_failures"]

@events.quitting.add_listener
def _write(environment, **kwargs):
    with open(os.environ["PER_WORKER_FILE"], "w") as file:
        json.dump(reported, file)
"""

CORRUPTED_BYTE = 17


def start_locust(
    cwd: Path, *arguments: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "locust", "--loglevel=WARNING", *arguments],
        cwd=cwd,  # nothing may depend on being run from the repository
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes: list[subprocess.Popen[str]], timeout: float = 40) -> list[str]:
    """Wait for every process (in order) and return their stderr; kill what is left on failure."""
    try:
        return [process.communicate(timeout=timeout)[1] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def stats_row(prefix: Path, request_type: str, name: str) -> dict[str, str]:
    """The one request row of Locust's <prefix>_stats.csv, checked to be the only one."""
    rows = read_csv(prefix.with_name(prefix.name + "_stats.csv"))
    assert [(row["Type"], row["Name"]) for row in rows] == [
        (request_type, name),
        ("", "Aggregated"),
    ], rows
    return rows[0]


def failures(prefix: Path) -> list[dict[str, str]]:
    return read_csv(prefix.with_name(prefix.name + "_failures.csv"))


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[int]:
    process, port = start_cli_server([], tmp_path)
    yield port
    assert stop_cli_server(process) == 0


class MisbehavingServer(socketserver.ThreadingTCPServer):
    """An echo server that gets one thing wrong, on every connection or only on the first.

    ``corrupt``: byte CORRUPTED_BYTE of every connection's stream comes back flipped. On the
    first connection only: ``short`` echoes 40 bytes and closes, ``reset`` reads and resets,
    ``silent`` reads and never answers. Later connections echo faithfully.
    """

    def __init__(self, behaviour: str) -> None:
        super().__init__(("127.0.0.1", 0), MisbehavingHandler)
        self.behaviour = behaviour
        self.connections = itertools.count()


class MisbehavingHandler(socketserver.BaseRequestHandler):
    server: MisbehavingServer

    def handle(self) -> None:
        with contextlib.suppress(ConnectionResetError):  # Locust hangs up as the run ends
            self._echo(self.server.behaviour, first=next(self.server.connections) == 0)

    def _echo(self, behaviour: str, *, first: bool) -> None:
        position = 0
        while chunk := self.request.recv(65536):
            data = bytearray(chunk)
            if behaviour == "corrupt" and position <= CORRUPTED_BYTE < position + len(data):
                data[CORRUPTED_BYTE - position] ^= 0xFF
            elif first and behaviour == "short":
                self.request.sendall(data[:40])
                return
            elif first and behaviour == "reset":
                # Closed here with no linger: an RST, not the FIN socketserver would send first.
                linger = struct.pack("ii", 1, 0)
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.request.close()
                return
            elif first and behaviour == "silent":
                continue
            position += len(data)
            self.request.sendall(data)


@contextlib.contextmanager
def misbehaving_server(behaviour: str) -> Iterator[int]:
    server = MisbehavingServer(behaviour)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()  # joins the handler threads: Locust has closed its connections
        thread.join()


@pytest.mark.slow
@needs_locust
def test_master_and_two_workers_echo_without_failures(echo_server: int, tmp_path: Path) -> None:
    per_worker_file = tmp_path / "per_worker.py"
    per_worker_file.write_text(PER_WORKER)
    master_port = free_port()
    prefix = tmp_path / "echo"
    master = start_locust(
        tmp_path,
        f"--locustfile={LOCUSTFILE},{per_worker_file}",
        "--master",
        "--master-bind-host=127.0.0.1",
        f"--master-bind-port={master_port}",
        "--expect-workers=2",
        "--headless",
        "--users=4",
        "--spawn-rate=100",
        "--run-time=3s",  # counted from when both workers are in: the master's clock is fresh
        "--stop-timeout=2",
        f"--host=tcp://127.0.0.1:{echo_server}",
        "--echo-size=100",  # the workers get it from the master: their requests' name says so
        f"--csv={prefix}",
        env={**os.environ, "PER_WORKER_FILE": str(tmp_path / "per_worker.json")},
    )
    workers = [
        start_locust(
            tmp_path,
            f"--locustfile={LOCUSTFILE}",
            "--worker",
            "--master-host=127.0.0.1",
            f"--master-port={master_port}",
        )
        for _ in range(2)
    ]
    outputs = finish([master, *workers])
    assert [process.returncode for process in (master, *workers)] == [0, 0, 0], outputs

    row = stats_row(prefix, "TCP", "pingpong 100 B")
    assert int(row["Request Count"]) > 0, row
    assert int(row["Failure Count"]) == 0, row
    assert row["Average Content Size"] == "100.0", row
    assert failures(prefix) == []
    reported = json.loads((tmp_path / "per_worker.json").read_text())
    assert len(reported) == 2, reported
    for totals in reported.values():
        assert totals["requests"] > 0, reported
        assert totals["failures"] == 0, reported


@pytest.mark.slow
@needs_locust
def test_tls_with_a_ca_file_or_accepting_any_certificate(
    tls_files: dict[str, str], tmp_path: Path
) -> None:
    server, port = start_cli_server(
        [
            "--listen=tls://127.0.0.1:0",
            f"--tls-cert={tls_files['tls_cert']}",
            f"--tls-key={tls_files['tls_key']}",
        ],
        tmp_path,
    )
    # (options, the request name, the CSV prefix)
    runs = [
        (["--echo-mode=oneshot", f"--echo-tls-ca={tls_files['ca']}"], "oneshot 64 B", "verified"),
        (["--echo-mode=pingpong"], "pingpong 64 B", "any"),
    ]
    try:
        processes = [
            start_locust(
                tmp_path,
                f"--locustfile={LOCUSTFILE}",
                "--headless",
                "--users=2",
                "--spawn-rate=100",
                RUN_TIME,
                f"--host=tls://127.0.0.1:{port}",
                "--echo-size=64",
                f"--csv={tmp_path / prefix}",
                *options,
            )
            for options, _, prefix in runs
        ]
        outputs = finish(processes)
    finally:
        assert stop_cli_server(server) == 0
    assert [process.returncode for process in processes] == [0, 0], outputs
    for _, name, prefix in runs:
        row = stats_row(tmp_path / prefix, "TLS", name)
        assert int(row["Request Count"]) > 0, row
        assert int(row["Failure Count"]) == 0, row
        assert failures(tmp_path / prefix) == []


# (behaviour, users, extra options, the message of each user's one failure)
MISBEHAVIOURS = [
    (
        "corrupt",
        3,
        [],
        f"echo differs from what was sent at byte {CORRUPTED_BYTE} of 100 (1 byte wrong)",
    ),
    ("short", 1, [], "connection closed after 40 of 100 bytes"),
    ("reset", 1, [], "Connection reset by peer (ECONNRESET) after 0 of 100 bytes"),
    ("silent", 1, ["--echo-timeout=0.5"], "no echo within 0.5 s: 0 of 100 bytes"),
]


@pytest.mark.slow
@needs_locust
def test_a_wrong_short_reset_or_missing_echo_is_a_failure_that_says_which(
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(misbehaving_server(case[0])) for case in MISBEHAVIOURS]
        processes = [
            start_locust(
                tmp_path,
                f"--locustfile={LOCUSTFILE}",
                "--headless",
                f"--users={users}",
                "--spawn-rate=100",
                RUN_TIME,
                f"--host=tcp://127.0.0.1:{port}",
                "--echo-size=100",
                f"--csv={tmp_path / behaviour}",
                *options,
            )
            for (behaviour, users, options, _), port in zip(MISBEHAVIOURS, ports, strict=True)
        ]
        outputs = finish(processes)
    for (behaviour, users, _, message), process, output in zip(
        MISBEHAVIOURS, processes, outputs, strict=True
    ):
        # 1: Locust's exit status for a run with failures.
        assert process.returncode == 1, (behaviour, output)
        row = stats_row(tmp_path / behaviour, "TCP", "pingpong 100 B")
        assert int(row["Failure Count"]) == users, (behaviour, row)
        # A connection stays in step after a mismatch and is replaced after anything else:
        # either way the echoes after the failure succeed.
        assert int(row["Request Count"]) > users, (behaviour, row)
        [failure] = failures(tmp_path / behaviour)
        assert (failure["Method"], failure["Name"]) == ("TCP", "pingpong 100 B"), failure
        kind = "EchoMismatch" if behaviour == "corrupt" else "EchoError"
        assert failure["Error"] == f"{kind}({message!r})", failure
        assert failure["Occurrences"] == str(users), failure


@needs_locust
def test_a_bad_option_ends_in_one_line_and_status_2(tmp_path: Path) -> None:
    cases = [
        (["--host=http://127.0.0.1:1"], "--host must be tcp://HOST:PORT or tls://HOST:PORT"),
        (["--host=tcp://127.0.0.1:1", "--echo-tls-ca=ca.pem"], "--echo-tls-ca needs a tls://"),
        (["--host=tls://127.0.0.1:1", "--echo-tls-ca=missing.pem"], "--echo-tls-ca missing.pem"),
        (["--host=tcp://127.0.0.1:1", "--echo-size=0"], "--echo-size: must be at least 1 byte"),
    ]
    processes = [
        start_locust(tmp_path, f"--locustfile={LOCUSTFILE}", "--headless", *arguments)
        for arguments, _ in cases
    ]
    outputs = finish(processes)
    for (arguments, message), process, output in zip(cases, processes, outputs, strict=True):
        assert process.returncode == 2, (arguments, output)
        [line] = output.splitlines()
        assert message in line, (arguments, output)


def test_locust_is_an_optional_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "locust" not in base
    assert "gevent" not in base
    [requirement] = project["optional-dependencies"]["locust"]
    assert requirement.startswith("locust>=")


def test_importing_echo_async_imports_neither_locust_nor_gevent() -> None:
    code = (
        "import sys, echo_async, echo_async.bench, echo_async.cli, echo_async.testing; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('locust', 'gevent')))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
