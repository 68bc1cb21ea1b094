"""Run the installed `echo-async` command as a subprocess and read its JSON log records."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def cli_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m echo_async`."""
    script = Path(sys.executable).with_name("echo-async")
    if script.exists():
        return [str(script)]
    found = shutil.which("echo-async")
    return [found] if found else [sys.executable, "-m", "echo_async"]


def read_records(log_path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line the server wrote so far."""
    records = []
    for line in log_path.read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


class CliServer(subprocess.Popen[bytes]):
    """A running `echo-async serve` whose stdout (JSON log records) goes to `log_path`."""

    log_path: Path

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.log_path)


def start_cli_server(
    extra: list[str], tmp_path: Path, timeout: float = 15.0
) -> tuple[CliServer, int]:
    """Start `echo-async serve --port 0 --log-format json` and wait for its `listening` record."""
    log_path = tmp_path / f"server-{time.monotonic_ns()}.jsonl"
    stderr_path = log_path.with_suffix(".stderr")
    with log_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = CliServer(
            [*cli_command(), "serve", "--port", "0", "--log-format", "json", *extra],
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    process.log_path = log_path
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in process.records() if log_path.stat().st_size else []:
            if record.get("event") == "listening":
                # tcp://127.0.0.1:PORT, or ws://127.0.0.1:PORT/PATH
                port = int(record["addresses"][0].rsplit(":", 1)[1].partition("/")[0])
                return process, port
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: {stderr_path.read_text()}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError("server did not log 'listening' in time")


def stop_cli_server(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, wait, and return the exit status (kill if it hangs, and fail)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("server did not exit after SIGTERM") from None


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll `predicate()` until true; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def echo(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send `payload`, shut down our sending side, return all the server sent until EOF."""
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def stalled_client(port: int) -> socket.socket:
    """A client that sent until every buffer filled and never reads: a drain can't finish."""
    hog = socket.create_connection(("127.0.0.1", port))
    hog.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(100_000):
            hog.send(b"x" * 65536)
    return hog
