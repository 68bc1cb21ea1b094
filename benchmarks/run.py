#!/usr/bin/env python3
"""The benchmark matrix: echo-async against a C epoll echo server, on this machine, with medians.

    python benchmarks/run.py [--rounds 3] [--secs 3] [--out benchmarks/results/latest.json]
                             [--plot benchmarks/results/latest.png]

Every measurement starts a fresh server pinned to one CPU (`--server-cpu`, default 0) and runs the
C load generator pinned to another (`--load-cpu`, default 1), so the server's core is the limit.
Within each round every workload is run against every server, servers interleaved (their order
rotates from round to round); the report gives each server's median over the rounds and the median
of its per-round ratios to epoll_echo, which is paired and so robust to the machine drifting.
The yardsticks (`loadgen`, `epoll_echo`) are this repository's own C sources in
benchmarks/yardsticks/, built with `cc` (or `gcc`) into benchmarks/yardsticks/build/ on first use
and again whenever a source is newer than its binary. For oneshot, `LOADGEN_SRC_IPS=200` in the
environment spreads loadgen's connections over 200 loopback source addresses (see loadgen.c).

Everything targets 127.0.0.1, every child process is stopped at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
YARDSTICK_SOURCES = HERE / "yardsticks"
# Inside the repository and ignored by git (`build/`): a clone needs nothing from elsewhere.
DEFAULT_TOOLS_DIR = YARDSTICK_SOURCES / "build"
COMPILE_FLAGS = ("-O2", "-Wall", "-Wextra")
COMPILE_TIMEOUT_S = 120.0
HOST = "127.0.0.1"
REFERENCE = "epoll_echo"

DEFAULT_WORKLOADS = (
    "pingpong:1:1024",
    "pingpong:10:1024",
    "pingpong:100:1024",
    "pingpong:1000:1024",
    "pingpong:9000:64",
    "stream:10:65536",
    "oneshot:50:64",
    "hold:9000:64",
)
# The targets: minimum ratio to epoll_echo, and the RSS bound for idle connections.
RATIO_TARGETS = {
    "pingpong:100:1024": 0.90,
    "pingpong:1000:1024": 0.85,
    "stream:10:65536": 1.0,
    "oneshot:50:64": 0.85,
}
HOLD_TARGET_KIB_PER_CONNECTION = 2.0
# Descriptors a process needs besides its connections (stdio, epoll, listener, Python's own).
FD_HEADROOM = 64
# How long a server may take to accept its first connection, and to exit after SIGTERM.
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 12.0
# How often a held server's memory and descriptors are sampled during a `hold` workload.
SAMPLE_INTERVAL_S = 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived; unwinds like Ctrl-C so that children are stopped."""


@dataclass(frozen=True, slots=True)
class Workload:
    """One `loadgen` invocation: MODE:CONNS:SIZE."""

    mode: str
    connections: int
    size: int

    @classmethod
    def parse(cls, text: str) -> Workload:
        """`pingpong:100:1024` -> Workload; raises ValueError on anything else."""
        try:
            mode, connections, size = text.split(":")
            workload = cls(mode, int(connections), int(size))
        except ValueError:
            raise ValueError(f"workload {text!r}: expected MODE:CONNS:SIZE") from None
        if mode not in ("pingpong", "stream", "oneshot", "hold"):
            raise ValueError(f"workload {text!r}: unknown mode {mode!r}")
        if workload.connections < 1 or workload.size < 1:
            raise ValueError(f"workload {text!r}: CONNS and SIZE must be positive")
        return workload

    @property
    def name(self) -> str:
        return f"{self.mode}:{self.connections}:{self.size}"

    @property
    def metric(self) -> str:
        """The loadgen field that says how well a server did (higher is better, except hold)."""
        return {"stream": "mb_per_s", "hold": "rss_growth_bytes_per_connection"}.get(
            self.mode, "ops_per_s"
        )


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """A server under test: a name and a command line with `{port}` in it."""

    name: str
    command: str
    # Workloads this server runs; empty means all of them.
    only: tuple[str, ...] = ()

    def argv(self, port: int) -> list[str]:
        return shlex.split(self.command.replace("{port}", str(port)))


@dataclass(slots=True)
class Measurement:
    """One server under one workload in one round."""

    round: int
    server: str
    workload: str
    loadgen: dict[str, Any]
    rss_kb_before: int | None
    rss_kb_after: int | None
    rss_growth_bytes_per_connection: float | None = None
    connections_held: int | None = None
    # CPU time over wall time while loadgen ran (warm-up second included).
    server_cpu_share: float | None = None
    server_cpu_us_per_op: float | None = None
    loadgen_cpu_share: float | None = None
    other_cpu_share: float | None = None
    time_wait_before: int | None = None
    attempts: int = 1
    note: str | None = None
    error: str | None = None

    def value(self, metric: str) -> float | None:
        if self.error is not None:
            return None
        if metric == "rss_growth_bytes_per_connection":
            return self.rss_growth_bytes_per_connection
        found = self.loadgen.get(metric)
        return float(found) if isinstance(found, int | float) else None


@dataclass(slots=True)
class Summary:
    """A server's medians under one workload, and how they compare with epoll_echo."""

    server: str
    workload: str
    metric: str
    median: float | None
    values: list[float]
    ratio_to_reference: float | None
    ratio_of_medians: float | None
    p50_us: float | None
    p99_us: float | None
    rss_kb_after: float | None
    server_cpu_share: float | None = None
    server_cpu_us_per_op: float | None = None
    # epoll_echo's CPU per operation over this server's: the ratio when both are CPU-bound.
    cpu_cost_ratio: float | None = None
    loadgen_cpu_share: float | None = None
    target: str | None = None
    meets_target: bool | None = None
    notes: list[str] = field(default_factory=list)


# -- processes ---------------------------------------------------------------------------------


class Children:
    """Every process this script starts, so that all of them are stopped however it ends."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], stdout: Any) -> subprocess.Popen[bytes]:
        # A session of its own: a terminal's Ctrl-C reaches only this script, which then stops
        # the child itself (and any process the child started) through its process group.
        process = subprocess.Popen(
            list(argv), stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the child's process group, SIGKILL it after `timeout` s."""
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        # Anything the child left behind in its group goes too.
        _signal_group(process, signal.SIGKILL)
        if process in self._processes:
            self._processes.remove(process)

    def stop_all(self) -> None:
        for process in list(self._processes):
            self.stop(process, timeout=2.0)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once `port` accepts a connection; raise if the server exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before listening")
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server not listening on {HOST}:{port} after {timeout:.0f} s")


def read_status(pid: int, key: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a --workers supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree = [pid]
    for member in tree:
        tree.extend(children.get(member, []))
    return tree


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time so far of a process and its descendants, live or reaped."""
    root = _stat_fields(pid)
    if root is None:
        return None
    # utime, stime, then cutime, cstime: the children it has already waited for.
    total = sum(int(value) for value in root[11:15])
    for member in process_tree(pid)[1:]:
        fields = _stat_fields(member)
        if fields is not None:
            total += sum(int(value) for value in fields[11:13])
    return total / CLOCK_TICKS


def tree_rss_kb(pid: int) -> int | None:
    """VmRSS of a process plus its descendants' (shared pages are counted once per process)."""
    sizes = [read_status(member, "VmRSS") for member in process_tree(pid)]
    return sum(size for size in sizes if size is not None) if sizes[0] is not None else None


def tree_fds(pid: int) -> int:
    return sum(count_fds(member) for member in process_tree(pid))


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent running processes, or stolen by the hypervisor, so far.

    Interrupt and softirq time is left out: loopback TCP's own packet processing lands there.
    """
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (
            int(value) for value in stat.readline().split()[1:9]
        )
    return (user + nice + system + steal) / CLOCK_TICKS


def wait_quiet(threshold: float, timeout: float) -> float:
    """Wait until the machine's busy CPUs over half a second fall below `threshold`.

    Returns the last reading; gives up after `timeout` s (the measurement is then retried or
    flagged by its `other_cpu_share`).
    """
    deadline = time.monotonic() + timeout
    while True:
        before = machine_busy_seconds()
        time.sleep(0.5)
        busy = (machine_busy_seconds() - before) / 0.5
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def time_wait_sockets() -> int | None:
    """TCP sockets in TIME-WAIT machine-wide: they make loadgen's connect() slower in oneshot."""
    with contextlib.suppress(OSError, ValueError), open("/proc/net/sockstat") as sockstat:
        for line in sockstat:
            if line.startswith("TCP:"):
                words = line.split()
                return int(words[words.index("tw") + 1])
    return None


def count_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError):
        return 0


# -- the yardsticks ----------------------------------------------------------------------------


def ensure_tool(given: Path | None, name: str, tools_dir: Path) -> Path:
    """The path of a C yardstick: the one given, or tools_dir/name, built first if it is stale."""
    if given is not None:
        if not (given.is_file() and os.access(given, os.X_OK)):
            raise SystemExit(f"run.py: error: {given} is not an executable")
        return given
    source = YARDSTICK_SOURCES / f"{name}.c"
    binary = tools_dir / name
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    build_tool(source, binary)
    return binary


def find_compiler() -> str:
    """`cc`, else `gcc`; ends the run with one clear line when neither is installed."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit(
            "run.py: error: no C compiler (cc or gcc) found to build the yardsticks in "
            f"{YARDSTICK_SOURCES}; install one, or pass --loadgen and --epoll-echo"
        )
    return compiler


def build_tool(source: Path, binary: Path) -> None:
    """Compile `source` into `binary`, atomically, so a concurrent run never sees half a file."""
    compiler = find_compiler()
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f".{binary.name}.{os.getpid()}.partial")
    try:
        built = subprocess.run(
            [compiler, *COMPILE_FLAGS, "-o", str(partial), str(source)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
        if built.returncode != 0:
            raise SystemExit(
                f"run.py: error: {compiler} could not build {source}:\n{built.stderr.strip()}"
            )
        os.replace(partial, binary)
    finally:
        partial.unlink(missing_ok=True)


def default_echo_async() -> str:
    """The `echo-async` next to this Python (a virtualenv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "echo-async"
    if beside.exists():
        return str(beside)
    found = shutil.which("echo-async")
    if found is None:
        raise SystemExit("run.py: error: echo-async not found; pass --echo-async")
    return found


def has_workers_option(echo_async: str) -> bool:
    """Whether `echo-async serve` has a --workers option (read from its --help)."""
    helped = subprocess.run(
        [*shlex.split(echo_async), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "--workers" in helped.stdout


# -- one measurement ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bench:
    """Everything a measurement needs besides the server and the workload."""

    loadgen: Path
    secs: float
    server_cpu: int
    load_cpu: int
    log_dir: Path
    children: Children
    # Noisy neighbours: CPUs other processes may use during a run before it is retried.
    max_other_cpu: float = 0.2
    retries: int = 2
    quiet_wait_s: float = 20.0


def measure_quietly(
    bench: Bench, server: ServerSpec, workload: Workload, round_index: int
) -> Measurement:
    """`measure`, after waiting for a quiet machine, retried while other processes took CPU.

    Keeps the attempt that other processes disturbed least.
    """
    best: Measurement | None = None
    attempts = 0
    while attempts <= bench.retries:
        attempts += 1
        wait_quiet(bench.max_other_cpu, bench.quiet_wait_s)
        measurement = measure(bench, server, workload, round_index)
        if best is None or _disturbance(measurement) < _disturbance(best):
            best = measurement
        if _disturbance(measurement) <= bench.max_other_cpu:
            break
    assert best is not None
    best.attempts = attempts
    if _disturbance(best) > bench.max_other_cpu and best.error is None:
        best.note = (best.note + "; " if best.note else "") + (
            f"other processes used {best.other_cpu_share:.2f} CPU during the run"
        )
    return best


def _disturbance(measurement: Measurement) -> float:
    if measurement.error is not None:
        return math.inf
    return measurement.other_cpu_share or 0.0


def measure(bench: Bench, server: ServerSpec, workload: Workload, round_index: int) -> Measurement:
    """Start `server` fresh, run `workload` against it once, stop it."""
    port = free_port()
    log_path = bench.log_dir / f"{server.name}-{workload.name.replace(':', '_')}-{round_index}.log"
    argv = ["taskset", "-c", str(bench.server_cpu), *server.argv(port)]
    with open(log_path, "wb") as log:
        process = bench.children.start(argv, stdout=log)
    try:
        wait_listening(port, process, START_TIMEOUT_S)
        if workload.mode == "hold":
            # Let the probe connection's close settle before the baseline.
            time.sleep(0.3)
        rss_before = tree_rss_kb(process.pid)
        fds_before = tree_fds(process.pid)
        time_wait = time_wait_sockets()
        loadgen_argv = [
            "taskset",
            "-c",
            str(bench.load_cpu),
            str(bench.loadgen),
            HOST,
            str(port),
            workload.mode,
            str(workload.connections),
            str(workload.size),
            str(bench.secs),
        ]
        with tempfile.TemporaryFile() as output:
            server_cpu_before = cpu_seconds(process.pid)
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            busy_before = machine_busy_seconds()
            began = time.monotonic()
            client = bench.children.start(loadgen_argv, stdout=output)
            held = _wait_sampling(client, process.pid, bench.secs + 1 + 60)
            wall = time.monotonic() - began
            server_cpu_after = cpu_seconds(process.pid)
            children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            busy = machine_busy_seconds() - busy_before
            bench.children.stop(client)
            output.seek(0)
            text = output.read().decode("utf-8", "replace")
        rss_after = tree_rss_kb(process.pid)
        result = _parse_loadgen(text, client.returncode)
        measurement = Measurement(
            round_index, server.name, workload.name, result, rss_before, rss_after
        )
        measurement.time_wait_before = time_wait
        # A server well below 1.0 here was not CPU-bound (or something else took its core).
        if server_cpu_before is not None and server_cpu_after is not None:
            measurement.server_cpu_share = round((server_cpu_after - server_cpu_before) / wall, 3)
            # The server's cost per operation: meaningful even when loadgen is the bottleneck.
            ops = result.get("ops_per_s")
            if workload.mode != "hold" and isinstance(ops, int | float) and ops > 0:
                measurement.server_cpu_us_per_op = round(
                    measurement.server_cpu_share / ops * 1e6, 2
                )
        # Only loadgen is reaped between the two readings, so the difference is its CPU time.
        loadgen_cpu = (children_after.ru_utime + children_after.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        measurement.loadgen_cpu_share = round(loadgen_cpu / wall, 3)
        # Whatever else ran meanwhile (other processes, interrupts): a noisy-neighbour gauge.
        server_cpu = (server_cpu_after or 0.0) - (server_cpu_before or 0.0)
        measurement.other_cpu_share = round(max(0.0, busy - server_cpu - loadgen_cpu) / wall, 3)
        if process.poll() is not None:
            measurement.error = f"server exited with status {process.returncode} during the run"
        elif workload.mode == "hold":
            _account_hold(measurement, held, fds_before, workload)
        if "error" in result:
            measurement.error = str(result["error"])
        elif result.get("mismatches"):
            measurement.error = f"{result['mismatches']} mismatched echoes"
        return measurement
    except RuntimeError as error:
        return Measurement(
            round_index, server.name, workload.name, {}, None, None, error=str(error)
        )
    finally:
        bench.children.stop(process)


@dataclass(slots=True)
class HeldSample:
    """The server's RSS when it held the most descriptors during a run."""

    fds: int = 0
    rss_kb: int | None = None
    peak_rss_kb: int | None = None


def _wait_sampling(client: subprocess.Popen[bytes], server_pid: int, timeout: float) -> HeldSample:
    """Wait for loadgen to exit, sampling the server's descriptors and RSS meanwhile."""
    held = HeldSample()
    deadline = time.monotonic() + timeout
    while client.poll() is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"loadgen still running after {timeout:.0f} s")
        fds = tree_fds(server_pid)
        rss = tree_rss_kb(server_pid)
        if rss is not None:
            held.peak_rss_kb = max(held.peak_rss_kb or 0, rss)
            # The last sample at the highest descriptor count: every connection open and idle.
            if fds >= held.fds:
                held.fds = fds
                held.rss_kb = rss
        time.sleep(SAMPLE_INTERVAL_S)
    return held


def _account_hold(
    measurement: Measurement, held: HeldSample, fds_before: int, workload: Workload
) -> None:
    """RSS growth over the connections the server held (its descriptors) when it held most."""
    completed = int(measurement.loadgen.get("completed", 0))
    connections = held.fds - fds_before
    measurement.connections_held = connections
    if measurement.rss_kb_before is None or held.rss_kb is None or connections <= 0:
        measurement.error = "server RSS or descriptors could not be read"
        return
    if completed < workload.connections:
        # Not an error: the growth is still per held connection; the shortfall is worth a note.
        measurement.note = (
            f"{completed} of {workload.connections} connections echoed within the run "
            f"(server held {connections})"
        )
    growth_bytes = (held.rss_kb - measurement.rss_kb_before) * 1024
    measurement.rss_growth_bytes_per_connection = growth_bytes / connections
    measurement.rss_kb_after = held.rss_kb


def _parse_loadgen(text: str, status: int | None) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                parsed: dict[str, Any] = json.loads(line)
                return parsed
    return {"error": f"loadgen exited with status {status} and no result: {text.strip()[-300:]}"}


# -- the matrix --------------------------------------------------------------------------------


def run_matrix(
    bench: Bench, servers: Sequence[ServerSpec], workloads: Sequence[Workload], rounds: int
) -> list[Measurement]:
    measurements: list[Measurement] = []
    total = rounds * sum(1 for w in workloads for s in servers if _runs(s, w))
    done = 0
    for round_index in range(rounds):
        # Rotate the order so that no server always runs first (or right after another).
        shift = round_index % len(servers)
        order = list(servers[shift:]) + list(servers[:shift])
        for workload in workloads:
            for server in order:
                if not _runs(server, workload):
                    continue
                done += 1
                measurement = measure_quietly(bench, server, workload, round_index)
                measurements.append(measurement)
                print(
                    f"[{done}/{total}] round {round_index + 1} {_progress(measurement)}", flush=True
                )
    return measurements


def _runs(server: ServerSpec, workload: Workload) -> bool:
    return not server.only or workload.name in server.only


def _progress(measurement: Measurement) -> str:
    head = f"{measurement.workload:<20} {measurement.server:<16}"
    if measurement.error:
        return f"{head} ERROR {measurement.error}"
    result = measurement.loadgen
    if measurement.rss_growth_bytes_per_connection is not None:
        return (
            f"{head} {measurement.rss_growth_bytes_per_connection / 1024:8.2f} KiB/conn over "
            f"{measurement.connections_held} held; {measurement.note or 'all echoed'}"
        )
    return (
        f"{head} {result.get('ops_per_s', 0):>10,.0f} ops/s {result.get('mb_per_s', 0):>9.1f} MB/s"
        f"  p99 {result.get('p99_us', 0):>7,.0f} us  rss {measurement.rss_kb_after} kB"
        f"  cpu server {measurement.server_cpu_share} loadgen {measurement.loadgen_cpu_share}"
        f" other {measurement.other_cpu_share} tw {measurement.time_wait_before}"
        f" (attempt {measurement.attempts})"
    )


def summarize(
    measurements: Sequence[Measurement],
    servers: Sequence[ServerSpec],
    workloads: Sequence[Workload],
) -> list[Summary]:
    summaries: list[Summary] = []
    for workload in workloads:
        metric = workload.metric
        reference = _by_round(measurements, REFERENCE, workload.name, metric)
        reference_median = statistics.median(reference.values()) if reference else None
        for server in servers:
            if not _runs(server, workload):
                continue
            mine = _by_round(measurements, server.name, workload.name, metric)
            runs = [
                m for m in measurements if m.server == server.name and m.workload == workload.name
            ]
            summary = Summary(
                server=server.name,
                workload=workload.name,
                metric=metric,
                median=statistics.median(mine.values()) if mine else None,
                values=[mine[r] for r in sorted(mine)],
                ratio_to_reference=None,
                ratio_of_medians=None,
                p50_us=_median_field(runs, "p50_us"),
                p99_us=_median_field(runs, "p99_us"),
                rss_kb_after=_median([m.rss_kb_after for m in runs if m.error is None]),
                server_cpu_share=_median([m.server_cpu_share for m in runs if m.error is None]),
                loadgen_cpu_share=_median([m.loadgen_cpu_share for m in runs if m.error is None]),
                server_cpu_us_per_op=_median(
                    [m.server_cpu_us_per_op for m in runs if m.error is None]
                ),
                notes=[
                    f"round {m.round + 1}: {m.error or m.note}" for m in runs if m.error or m.note
                ],
            )
            reference_cost = _median(
                [
                    m.server_cpu_us_per_op
                    for m in measurements
                    if m.server == REFERENCE and m.workload == workload.name and m.error is None
                ]
            )
            if reference_cost and summary.server_cpu_us_per_op:
                summary.cpu_cost_ratio = reference_cost / summary.server_cpu_us_per_op
            if workload.mode != "hold":
                paired = [mine[r] / reference[r] for r in mine if reference.get(r)]
                summary.ratio_to_reference = statistics.median(paired) if paired else None
                if summary.median is not None and reference_median:
                    summary.ratio_of_medians = summary.median / reference_median
            _judge(summary, workload)
            summaries.append(summary)
    return summaries


def _by_round(
    measurements: Sequence[Measurement], server: str, workload: str, metric: str
) -> dict[int, float]:
    found: dict[int, float] = {}
    for m in measurements:
        if m.server == server and m.workload == workload:
            value = m.value(metric)
            if value is not None:
                found[m.round] = value
    return found


def _median(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def _median_field(runs: Sequence[Measurement], name: str) -> float | None:
    return _median([m.loadgen.get(name) for m in runs if m.error is None])


def _judge(summary: Summary, workload: Workload) -> None:
    if summary.server == REFERENCE:
        return
    if workload.mode == "hold":
        limit = HOLD_TARGET_KIB_PER_CONNECTION
        summary.target = f"<= {limit:g} KiB/conn"
        if summary.median is not None:
            summary.meets_target = summary.median <= limit * 1024
        return
    minimum = RATIO_TARGETS.get(workload.name)
    if minimum is not None:
        summary.target = f">= {minimum:.2f}x"
        if summary.ratio_to_reference is not None:
            summary.meets_target = summary.ratio_to_reference >= minimum


# -- report ------------------------------------------------------------------------------------


def machine_info(echo_async: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "echo_async_command": echo_async,
    }
    for package in ("uvloop", "structlog", "echo-async"):
        try:
            info[f"{package.replace('-', '_')}_version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[f"{package.replace('-', '_')}_version"] = None
    # The repository's state; the code under test is `echo_async_command`'s, which may differ.
    info["repository_head"] = _git("rev-parse", "HEAD")
    info["repository_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    info["fd_limit"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _git(*args: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()
    return None


def format_table(summaries: Sequence[Summary]) -> str:
    """A Markdown table of medians and ratios, as docs/performance.md shows it."""
    lines = [
        "| workload | server | median | unit | ratio vs epoll_echo | p99 us | RSS kB "
        "| server CPU | CPU us/op | CPU-cost ratio | target | met |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in summaries:
        unit = {"ops_per_s": "ops/s", "mb_per_s": "MB/s"}.get(s.metric, "KiB/conn")
        if s.median is None:
            median = "n/a"
        elif s.metric == "rss_growth_bytes_per_connection":
            median = f"{s.median / 1024:.2f}"
        elif s.metric == "mb_per_s":
            median = f"{s.median:,.1f}"
        else:
            median = f"{s.median:,.0f}"
        ratio = "" if s.ratio_to_reference is None else f"{s.ratio_to_reference:.2f}x"
        p99 = (
            ""
            if s.p99_us is None or s.metric == "rss_growth_bytes_per_connection"
            else (f"{s.p99_us:,.0f}")
        )
        rss = "" if s.rss_kb_after is None else f"{s.rss_kb_after:,.0f}"
        cpu = "" if s.server_cpu_share is None else f"{s.server_cpu_share:.0%}"
        per_op = "" if s.server_cpu_us_per_op is None else f"{s.server_cpu_us_per_op:.2f}"
        cost = "" if s.cpu_cost_ratio is None else f"{s.cpu_cost_ratio:.2f}x"
        met = {True: "yes", False: "**no**", None: ""}[s.meets_target]
        lines.append(
            f"| {s.workload} | {s.server} | {median} | {unit} | {ratio} | {p99} | {rss} "
            f"| {cpu} | {per_op} | {cost} | {s.target or ''} | {met} |"
        )
    return "\n".join(lines)


def plot(summaries: Sequence[Summary], path: Path) -> bool:
    """Bars of each server's ratio to epoll_echo per workload, and of idle-connection RSS."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ratios = [s for s in summaries if s.ratio_to_reference is not None and s.server != REFERENCE]
    holds = [s for s in summaries if s.metric == "rss_growth_bytes_per_connection"]
    workloads = list(dict.fromkeys(s.workload for s in ratios))
    servers = list(dict.fromkeys(s.server for s in ratios))
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [4, 1]}
    )
    width = 0.8 / max(len(servers), 1)
    colors: dict[str, Any] = {}
    for index, server in enumerate(servers):
        heights = [
            next(
                (
                    s.ratio_to_reference or 0.0
                    for s in ratios
                    if s.server == server and s.workload == w
                ),
                0.0,
            )
            for w in workloads
        ]
        positions = [x + (index - (len(servers) - 1) / 2) * width for x in range(len(workloads))]
        bars = left.bar(positions, heights, width, label=server)
        colors[server] = bars.patches[0].get_facecolor() if bars.patches else None
    for x, workload in enumerate(workloads):
        target = RATIO_TARGETS.get(workload)
        if target is not None:
            left.hlines(target, x - 0.45, x + 0.45, colors="black", linestyles="dashed")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_xticks(range(len(workloads)), workloads, rotation=30, ha="right")
    left.set_ylabel("throughput / epoll_echo (median of per-round ratios)")
    left.set_title("Throughput relative to a C epoll echo server (dashed: target)")
    left.set_ylim(0, 1.3)
    left.legend(loc="upper center", ncol=len(servers), fontsize="small")
    hold_servers = [s.server for s in holds]
    right.bar(
        hold_servers,
        [(s.median or 0.0) / 1024 for s in holds],
        color=[colors.get(server) or "tab:grey" for server in hold_servers],
    )
    right.axhline(HOLD_TARGET_KIB_PER_CONNECTION, color="black", linestyle="dashed")
    right.set_ylabel("server RSS growth, KiB per idle connection")
    right.set_title(holds[0].workload if holds else "hold")
    right.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark echo-async against a C epoll echo server (medians, ratios).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (at least 3 for medians)")
    parser.add_argument("--secs", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "latest.png")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--loadgen", type=Path, help="a built loadgen (default: build it)")
    parser.add_argument("--epoll-echo", type=Path, help="a built epoll_echo (default: build it)")
    parser.add_argument(
        "--tools-dir",
        type=Path,
        default=DEFAULT_TOOLS_DIR,
        help="where the yardsticks built from benchmarks/yardsticks/*.c go",
    )
    parser.add_argument("--echo-async", default=None, help="the echo-async command to test")
    parser.add_argument(
        "--workload",
        action="append",
        dest="workloads",
        metavar="MODE:CONNS:SIZE",
        help=f"repeatable; default: {' '.join(DEFAULT_WORKLOADS)}",
    )
    parser.add_argument(
        "--server",
        action="append",
        dest="servers",
        metavar="NAME=COMMAND",
        help="repeatable; replaces the echo-async servers (epoll_echo always runs); "
        "COMMAND contains {port}",
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--keep-logs", type=Path, help="keep server output in this directory")
    parser.add_argument(
        "--max-other-cpu",
        type=float,
        default=0.2,
        help="CPUs other processes may use during a run before it is retried",
    )
    parser.add_argument("--retries", type=int, default=2, help="retries of a disturbed run")
    return parser


def choose_servers(
    args: argparse.Namespace, epoll_echo: Path, echo_async: str, notes: list[str]
) -> list[ServerSpec]:
    servers = [ServerSpec(REFERENCE, f"{shlex.quote(str(epoll_echo))} {{port}}")]
    if args.servers:
        for spec in args.servers:
            name, _, command = spec.partition("=")
            if not name or "{port}" not in command:
                raise SystemExit(
                    f"run.py: error: --server {spec!r}: expected NAME=COMMAND {{port}}"
                )
            servers.append(ServerSpec(name, command))
        return servers
    serve = f"{echo_async} serve --port {{port}} --log-format json"
    servers.append(ServerSpec("echo-async", serve))
    servers.append(ServerSpec("echo-async-norecords", f"{serve} --log-level warning"))
    servers.append(ServerSpec("echo-async-asyncio", f"{serve} --loop asyncio"))
    bare = HERE / "bare_protocol.py"
    servers.append(ServerSpec("uvloop-protocol", f"{shlex.quote(sys.executable)} {bare} {{port}}"))
    node = shutil.which("node")
    if node is not None:
        script = HERE / "peers" / "node_echo.js"
        servers.append(ServerSpec("node", f"{shlex.quote(node)} {script} {{port}}"))
    else:
        notes.append("node is not installed: the Node.js peer is skipped")
    if has_workers_option(echo_async):
        compared = ("pingpong:1000:1024", "oneshot:50:64")
        for count in (1, 2):
            servers.append(
                ServerSpec(f"echo-async-w{count}", f"{serve} --workers {count}", compared)
            )
        notes.append(
            "--workers 1 vs 2 measured on " + ", ".join(compared) + " with the same CPU pinning"
        )
    else:
        notes.append("echo-async serve has no --workers option: the workers comparison is skipped")
    return servers


def choose_workloads(args: argparse.Namespace, notes: list[str]) -> list[Workload]:
    texts = args.workloads or list(DEFAULT_WORKLOADS)
    try:
        workloads = [Workload.parse(text) for text in texts]
    except ValueError as error:
        raise SystemExit(f"run.py: error: {error}") from None
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fitting = []
    for workload in workloads:
        # loadgen is one process holding every connection, and so is the server.
        if workload.connections + FD_HEADROOM > limit:
            notes.append(f"{workload.name} skipped: needs more than the {limit} descriptor limit")
            continue
        fitting.append(workload)
    return fitting


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.secs <= 0:
        raise SystemExit("run.py: error: --rounds and --secs must be positive")
    if shutil.which("taskset") is None:
        raise SystemExit("run.py: error: taskset (util-linux) is needed to pin processes")
    notes: list[str] = []
    if args.rounds < 3:
        notes.append(f"only {args.rounds} round(s): medians are not robust")
    loadgen = ensure_tool(args.loadgen, "loadgen", args.tools_dir)
    epoll_echo = ensure_tool(args.epoll_echo, "epoll_echo", args.tools_dir)
    echo_async = args.echo_async or default_echo_async()
    servers = choose_servers(args, epoll_echo, echo_async, notes)
    workloads = choose_workloads(args, notes)
    for note in notes:
        print(f"note: {note}", flush=True)

    children = Children()
    previous = {
        signum: signal.signal(signum, _raise_interrupted)
        for signum in (signal.SIGTERM, signal.SIGHUP)
    }
    started = time.monotonic()
    try:
        with _log_dir(args.keep_logs) as log_dir:
            bench = Bench(
                loadgen,
                args.secs,
                args.server_cpu,
                args.load_cpu,
                log_dir,
                children,
                max_other_cpu=args.max_other_cpu,
                retries=args.retries,
            )
            measurements = run_matrix(bench, servers, workloads, args.rounds)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted: stopping every child process", file=sys.stderr)
        children.stop_all()
        return 130
    finally:
        children.stop_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    summaries = summarize(measurements, servers, workloads)
    table = format_table(summaries)
    print()
    print(table)
    for summary in summaries:
        for note in summary.notes:
            print(f"note: {summary.workload} {summary.server}: {note}")
    report = {
        "machine": machine_info(echo_async),
        "method": {
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "rounds": args.rounds,
            "secs": args.secs,
            "server_cpu": args.server_cpu,
            "load_cpu": args.load_cpu,
            "loadgen": str(loadgen),
            # Set for oneshot: loadgen's connections from this many loopback source addresses.
            "loadgen_src_ips": os.environ.get("LOADGEN_SRC_IPS"),
            "servers": [asdict(s) for s in servers],
            "workloads": [w.name for w in workloads],
            "ratio": "median over rounds of (server / epoll_echo in the same round)",
            "max_other_cpu": args.max_other_cpu,
            "retries": args.retries,
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        "notes": notes,
        "summary": [asdict(s) for s in summaries],
        "measurements": [asdict(m) for m in measurements],
        "table_markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.out}")
    if not args.no_plot:
        if plot(summaries, args.plot):
            print(f"plot: {args.plot}")
        else:
            print("plot: skipped (matplotlib is not importable)")
    return 1 if any(m.error for m in measurements) else 0


@contextlib.contextmanager
def _log_dir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="echo-bench-logs-") as temporary:
        yield Path(temporary)


if __name__ == "__main__":
    raise SystemExit(main())
