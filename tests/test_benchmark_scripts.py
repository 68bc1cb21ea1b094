"""The scripts in benchmarks/ still run (their figures are for people, not assertions)."""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_micro_benchmarks_report_every_row() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "micro.py"), "--repeat", "1", "--number", "50"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()[1:]
    rows = {line.rsplit(None, 2)[0]: float(line.split()[-2]) for line in lines}
    assert set(rows) == {
        "chunk: bare transport.write",
        "chunk: EchoConnection",
        "close record: stock structlog",
        "close record: echo-async CLI",
        "connection: set-up, 64 B, close",
    }
    assert all(value > 0 for value in rows.values())


NO_VALGRIND = "valgrind is not installed (apt-get install valgrind); .ci/run installs it"


def test_instruction_counts_come_per_connection_and_per_round_trip() -> None:
    if shutil.which("valgrind") is None:
        pytest.skip(NO_VALGRIND)
    done = subprocess.run(
        [
            *(sys.executable, str(BENCHMARKS / "instructions.py")),
            *("--oneshots", "5", "--round-trips", "50", str(BENCHMARKS.parent)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["tree", "idle", "per", "connection", "per", "round", "trip"]
    tree, idle, per_connection, per_round_trip = row.split()
    assert Path(tree) == BENCHMARKS.parent
    # Five connections are too few for the figures to mean anything (the idle run alone varies
    # by a million instructions): this checks the script runs end to end and reports numbers.
    assert int(idle.replace(",", "")) > 10**8  # an interpreter started, served and stopped
    int(per_connection.replace(",", ""))
    int(per_round_trip.replace(",", ""))


def test_bare_protocol_reference_echoes_and_stops_on_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(BENCHMARKS / "bare_protocol.py"), str(port)])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "bare_protocol.py never listened"
                time.sleep(0.05)
        with client:
            client.sendall(b"\x00\xffbytes")
            assert client.recv(100) == b"\x00\xffbytes"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


# -- the C yardsticks and run.py ---------------------------------------------------------------

REPO = BENCHMARKS.parent
HOST = "127.0.0.1"
# Warm-up (1 s) plus the measured seconds plus a generous margin for a loaded CI machine.
LOADGEN_TIMEOUT_S = 30.0


def _load_run_module() -> ModuleType:
    """benchmarks/run.py as a module, so the tests build the yardsticks the way it does."""
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up by name while the class bodies run.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run_module = _load_run_module()


@pytest.fixture(scope="module")
def yardsticks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """loadgen and epoll_echo, built from benchmarks/yardsticks/*.c into a fresh directory."""
    tools = tmp_path_factory.mktemp("yardsticks")
    return {name: run_module.ensure_tool(None, name, tools) for name in ("loadgen", "epoll_echo")}


@pytest.fixture
def epoll_echo_port(yardsticks: dict[str, Path]) -> Iterator[int]:
    """A running epoll_echo on a free port; the port comes from the line it prints."""
    process = subprocess.Popen(
        [str(yardsticks["epoll_echo"]), "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)
        assert ready, "epoll_echo printed nothing within 15 s"
        line = process.stdout.readline().decode()
        assert line.startswith("epoll_echo listening on 127.0.0.1:"), line
        yield int(line.rsplit(":", 1)[1])
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def run_loadgen(
    loadgen: Path, port: int, workload: str, seconds: float = 0.5, source_ips: int = 0
) -> tuple[int, dict[str, Any]]:
    """loadgen's exit status and its one JSON line."""
    mode, connections, size = workload.split(":")
    environment = {**os.environ, "LOADGEN_SRC_IPS": str(source_ips)}
    done = subprocess.run(
        [str(loadgen), HOST, str(port), mode, connections, size, str(seconds)],
        capture_output=True,
        text=True,
        timeout=LOADGEN_TIMEOUT_S,
        env=environment,
        check=False,
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 1, (done.stdout, done.stderr)
    result: dict[str, Any] = json.loads(lines[0])
    assert set(result) == {
        "mode",
        "conns",
        "size",
        "seconds",
        "ops_per_s",
        "mb_per_s",
        "p50_us",
        "p99_us",
        "p999_us",
        "completed",
        "errors",
        "mismatches",
    }
    return done.returncode, result


@pytest.mark.parametrize(
    ("workload", "source_ips"),
    [
        ("pingpong:10:1024", 0),
        ("pingpong:2:300000", 0),  # messages larger than a socket buffer: partial writes
        ("stream:4:65536", 0),
        ("oneshot:10:64", 0),
        ("oneshot:10:64", 4),
        ("hold:200:64", 0),
    ],
)
def test_loadgen_against_epoll_echo_checks_every_byte(
    yardsticks: dict[str, Path], epoll_echo_port: int, workload: str, source_ips: int
) -> None:
    status, result = run_loadgen(
        yardsticks["loadgen"], epoll_echo_port, workload, source_ips=source_ips
    )
    assert status == 0, result
    assert result["mismatches"] == 0
    assert result["errors"] == 0
    mode, connections, size = workload.split(":")
    assert (result["mode"], result["conns"], result["size"]) == (mode, int(connections), int(size))
    if mode == "stream":
        assert result["mb_per_s"] > 0
    elif mode == "hold":
        assert result["completed"] == int(connections)
    else:
        assert result["completed"] > 0
        assert result["ops_per_s"] > 0
        assert 0 < result["p50_us"] <= result["p99_us"] <= result["p999_us"]


def test_epoll_echo_returns_everything_to_a_client_that_reads_late(epoll_echo_port: int) -> None:
    """Partial writes: what the socket cannot take is kept, in order, and nothing is lost."""
    payload = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    with socket.create_connection((HOST, epoll_echo_port), timeout=30) as client:

        def send_all_then_shut() -> None:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_all_then_shut)
        sender.start()
        # Let the server's send buffer fill before reading anything back.
        time.sleep(0.3)
        received = bytearray()
        while chunk := client.recv(1 << 20):
            received += chunk
        sender.join(timeout=30)
    assert not sender.is_alive()
    assert len(received) == len(payload)
    assert received == payload


def test_loadgen_rejects_bad_usage_with_status_2(yardsticks: dict[str, Path]) -> None:
    for argv in (
        [],
        [HOST, "1", "sideways", "1", "1", "1"],
        [HOST, "1", "pingpong", "0", "1", "1"],
    ):
        done = subprocess.run(
            [str(yardsticks["loadgen"]), *argv],
            capture_output=True,
            text=True,
            timeout=LOADGEN_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 2
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1


class _CorruptingHandler(socketserver.BaseRequestHandler):
    """Echoes everything, but with one damage per connection (chosen by the server's `damage`)."""

    def handle(self) -> None:
        damage: str = self.server.damage  # type: ignore[attr-defined]
        position = 0
        done = False
        while chunk := self.request.recv(65536):
            data = bytearray(chunk)
            target = 100 - position
            if not done and 0 <= target < len(data):
                done = True
                if damage == "flip":
                    data[target] ^= 0x01
                elif damage == "drop":
                    del data[target]
                else:  # "extra": one byte nobody sent
                    data.insert(target, data[target])
            position += len(chunk)
            self.request.sendall(bytes(data))


class _CorruptingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.mark.parametrize("damage", ["flip", "drop", "extra"])
@pytest.mark.parametrize("mode", ["pingpong", "stream"])
def test_loadgen_reports_a_corrupted_echo(
    yardsticks: dict[str, Path], damage: str, mode: str
) -> None:
    server = _CorruptingServer((HOST, 0), _CorruptingHandler)
    server.damage = damage  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        status, result = run_loadgen(
            yardsticks["loadgen"], server.server_address[1], f"{mode}:1:512", seconds=0.2
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert result["mismatches"] >= 1
    assert status == 1


def test_run_py_smoke_run_measures_both_servers(tmp_path: Path) -> None:
    """A one-round, one-second run.py: builds the yardsticks, measures, writes clean JSON."""
    out = tmp_path / "results.json"
    tools = tmp_path / "tools"
    load_cpu = 1 if (os.cpu_count() or 1) > 1 else 0
    serve = f"{shlex.quote(sys.executable)} -m echo_async serve --port {{port}} --log-format json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "run.py"),
            "--rounds",
            "1",
            "--secs",
            "1",
            "--workload",
            "oneshot:20:64",
            "--workload",
            "pingpong:10:1024",
            "--server",
            f"echo-async={serve}",
            "--tools-dir",
            str(tools),
            "--out",
            str(out),
            "--no-plot",
            "--load-cpu",
            str(load_cpu),
            # Other tests may run meanwhile: measure once, whatever the neighbours do.
            "--max-other-cpu",
            "100",
            "--retries",
            "0",
        ],
        cwd=REPO,
        env={**os.environ, "LOADGEN_SRC_IPS": "8"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tools / "loadgen").exists()
    assert (tools / "epoll_echo").exists()
    report = json.loads(out.read_text())
    assert report["method"]["loadgen_src_ips"] == "8"
    measured = {(m["server"], m["workload"]): m for m in report["measurements"]}
    assert set(measured) == {
        (server, workload)
        for server in ("epoll_echo", "echo-async")
        for workload in ("oneshot:20:64", "pingpong:10:1024")
    }
    for measurement in measured.values():
        assert measurement["error"] is None, measurement
        assert measurement["loadgen"]["mismatches"] == 0
        assert measurement["loadgen"]["completed"] > 0
    assert "| oneshot:20:64 | echo-async |" in report["table_markdown"]


def test_run_py_without_a_c_compiler_says_so_in_one_line(tmp_path: Path) -> None:
    only_taskset = tmp_path / "bin"
    only_taskset.mkdir()
    taskset = shutil.which("taskset")
    assert taskset is not None
    (only_taskset / "taskset").symlink_to(taskset)
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--tools-dir", str(tmp_path / "tools")],
        env={**os.environ, "PATH": str(only_taskset)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.startswith("run.py: error: no C compiler (cc or gcc) found"), done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_the_benchmarks_need_nothing_outside_the_repository() -> None:
    """The issue's promise: a clone reruns every figure with the repository's own tools."""
    documents = [REPO / "README.md", REPO / "docs" / "performance.md"]
    documents += [path for path in BENCHMARKS.iterdir() if path.suffix in (".py", ".sh", ".md")]
    documents += list((BENCHMARKS / "yardsticks").glob("*.c"))
    for path in documents:
        text = path.read_text()
        for outside in ("../shared", "/tmp/echo-bench"):
            assert outside not in text, f"{path.relative_to(REPO)} names {outside}"
