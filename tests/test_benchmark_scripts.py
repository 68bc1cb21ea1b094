"""The scripts in benchmarks/ still run (their figures are for people, not assertions)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
