"""Instructions the server executes per connection and per round trip, counted by callgrind.

Timing figures on a shared machine move by 10-30 % from run to run; instruction counts do not
(valgrind's callgrind counts them whatever else the machine does). Use this to compare two
versions of the code on the same workload: each TREE is a directory holding an `echo_async`
package (a checkout, or `git worktree add /tmp/old <commit>`), the repository by default.

    python benchmarks/instructions.py --oneshots 2000 --round-trips 20000 /tmp/old .

For each tree the server runs under callgrind three times: idle (start and stop only), then with
one client that connects, sends 64 bytes, half-closes and reads the echo, N times in a row, then
with one connection doing M round trips of 1 KiB. A client that waits for each echo keeps the
server's work per operation the same from run to run. Prints the instructions per connection
and per round trip, the idle run subtracted. The idle run itself varies by about a million
instructions between runs (timers fire more when the interpreter is slow to start), so use
thousands of operations, and repeat. Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0  # the interpreter starts about 50 times slower under valgrind


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited {server.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not listen in time")


def oneshots(port: int, count: int) -> None:
    payload = b"x" * 64
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            echoed = b""
            while chunk := client.recv(4096):
                echoed += chunk
            if echoed != payload:
                raise SystemExit("oneshot: the echo differs")


def round_trips(port: int, count: int) -> None:
    block = b"y" * 1024
    with socket.create_connection(("127.0.0.1", port)) as client:
        for _ in range(count):
            client.sendall(block)
            received = 0
            while received < len(block):
                chunk = client.recv(4096)
                if not chunk:
                    raise SystemExit("round trips: the server closed")
                received += len(chunk)


def count(tree: Path, workload: str, operations: int) -> int:
    """Instructions of one server run (start, `operations` of `workload`, SIGTERM)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "callgrind.out"
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-P",  # not the current directory first on sys.path: TREE's echo_async
                "-m",
                "echo_async",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env={**os.environ, "PYTHONPATH": str(tree)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=directory,
        )
        try:
            wait_listening(port, server)
            if workload == "oneshot":
                oneshots(port, operations)
            elif workload == "roundtrip":
                round_trips(port, operations)
        finally:
            server.terminate()
            server.wait(START_TIMEOUT_S)
        match = re.search(r"^totals: (\d+)", out.read_text(), re.MULTILINE)
        if match is None:
            raise SystemExit(f"no totals in {out}")
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[REPOSITORY])
    parser.add_argument("--oneshots", type=int, default=2000)
    parser.add_argument("--round-trips", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'tree':40} {'idle':>14} {'per connection':>15} {'per round trip':>15}")
    for tree in args.trees:
        if not (tree / "echo_async" / "__init__.py").exists():
            raise SystemExit(f"{tree}: no echo_async package there")
        idle = count(tree, "idle", 0)
        per_connection = (count(tree, "oneshot", args.oneshots) - idle) / args.oneshots
        per_round_trip = (count(tree, "roundtrip", args.round_trips) - idle) / args.round_trips
        print(f"{tree!s:40} {idle:>14,} {per_connection:>15,.0f} {per_round_trip:>15,.0f}")


if __name__ == "__main__":
    main()
