"""`echo-async serve --workers N`: N worker processes on one port under a supervisor (Linux).

The supervisor holds the port with bound, never-listening sockets that set SO_REUSEPORT and not
SO_REUSEADDR (a busy port fails once, before any worker starts; port 0 becomes a real port; no
other user's program can take it) and starts each worker as
`python -m echo_async serve --config FILE` with `reuse_port = true`, so the kernel spreads new
connections over the workers' own listening sockets. It restarts a worker that dies, forwards
SIGTERM/SIGINT, waits for every drain, and serves the workers' summed metrics. docs/workers.md
explains the choices.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from echo_async import systemd
from echo_async.config import ENVIRONMENT_PREFIX, ServerConfig, ServiceConfig, parse_host_port
from echo_async.metrics import MetricsEndpoint
from echo_async.service import (
    EXIT_ABORTED,
    EXIT_OK,
    MULTIPROCESS_DIRECTORY,
    WORKER_ENVIRONMENT_VARIABLE,
    StartupError,
    os_reason,
)
from echo_async.sources import render_toml

EXIT_FAILURE = 1
RESTART_WINDOW_S = 10.0
MAX_RESTARTS = 5  # per worker within RESTART_WINDOW_S; the next death ends the supervisor
RESTART_BACKOFF_S = 0.1
# Beyond drain_delay + shutdown_timeout, for a worker's interpreter to exit.
SHUTDOWN_MARGIN_S = 5.0
# How often a slot checks its worker when it can't get a pidfd to wait on (EMFILE, say).
EXIT_POLL_INTERVAL_S = 0.1
# Never inherited by a worker: the supervisor alone talks to systemd, and owns the socket
# activation fds and the metrics directory.
_PRIVATE_VARIABLES = frozenset(
    {"NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", MULTIPROCESS_DIRECTORY}
)
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PR_SET_PDEATHSIG = 1
_MAX_UNIX_PATH = 100  # sun_path holds 108 bytes


def run_supervisor(service: ServiceConfig) -> int:
    """Run `service.workers` workers until SIGTERM/SIGINT and their drain; return the exit status.

    Raises StartupError, before any worker starts, when the port or the metrics address is busy.
    """
    if not sys.platform.startswith("linux"):
        raise StartupError("--workers needs Linux (SO_REUSEPORT spreads connections over workers)")
    if service.server.listen:
        raise StartupError("--workers serves --host and --port only; --listen needs --workers 1")
    activated = systemd.listen_fds()
    if activated:
        for sock in activated:
            sock.close()
        raise StartupError("--workers can't serve systemd socket activation's sockets")
    with contextlib.ExitStack() as stack:
        for sock in reserve_port(service.server):
            stack.enter_context(sock)
            port = sock.getsockname()[1]
        directory = Path(tempfile.mkdtemp(prefix="echo-async-"))
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        supervisor = Supervisor(service, port, directory)
        with asyncio.Runner() as runner:
            return runner.run(supervisor.run())


def reserve_port(config: ServerConfig) -> list[socket.socket]:
    """Bind, without listen(), an SO_REUSEPORT socket on every address of `config.host`.

    A socket that never listens receives no connections (Linux), yet it holds the port: a busy
    port raises StartupError here, port 0 becomes one real port for every address and worker,
    and only a socket of this user with SO_REUSEPORT (a worker) can bind the port beside it.
    """
    where = f"cannot listen on {config.host}:{config.port}"
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        port = config.port
        for family, kind, protocol, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            # No SO_REUSEADDR: Linux lets a socket with it bind and listen beside a socket that
            # has it too and doesn't listen, whoever owns either (another user's program, or
            # our own metrics endpoint). SO_REUSEPORT alone admits only this user's
            # SO_REUSEPORT sockets. Listening instead would take a share of the connections.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and address[0] == "::":
                # Dual stack, as a worker binds `::`: the IPv4 port is held and checked too.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise StartupError(f"{where}: {os_reason(error)}") from None
    return sockets


def worker_environment(
    environ: Mapping[str, str], index: int, notify_address: str, metrics_directory: str | None
) -> dict[str, str]:
    """A worker's environment: no ECHO_ASYNC_* (the config file has them merged already)."""
    environment = {
        name: value
        for name, value in environ.items()
        if not name.startswith(ENVIRONMENT_PREFIX) and name not in _PRIVATE_VARIABLES
    }
    environment[WORKER_ENVIRONMENT_VARIABLE] = str(index)
    environment["NOTIFY_SOCKET"] = notify_address
    if metrics_directory is not None:
        environment[MULTIPROCESS_DIRECTORY] = metrics_directory
    return environment


class RestartBudget:
    """One worker slot's restarts: a growing delay, and None once it crash-loops."""

    __slots__ = ("_restarts",)

    def __init__(self) -> None:
        self._restarts: collections.deque[float] = collections.deque()

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next restart (0, 0.1, 0.3, ...), or None to give up."""
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= MAX_RESTARTS:
            return None
        delay = RESTART_BACKOFF_S * ((1 << len(self._restarts)) - 1)
        self._restarts.append(now)
        return delay


class Supervisor:
    """The workers' lifecycle on one event loop: start, readiness, restart, signals, drain."""

    def __init__(self, service: ServiceConfig, port: int, directory: Path) -> None:
        self.service = service
        self.port = port
        self._config_path = directory / "worker.toml"
        worker_server = replace(service.server, port=port, reuse_port=True)
        worker = replace(service, workers=1, metrics="", server=worker_server)
        self._config_path.write_text(render_toml(worker))
        self._metrics_directory: str | None = None
        if service.metrics:
            (directory / "metrics").mkdir()
            self._metrics_directory = str(directory / "metrics")
        self._notify_address = str(directory / "notify")
        if len(os.fsencode(self._notify_address)) > _MAX_UNIX_PATH:
            self._notify_address = f"@echo-async-{os.getpid()}-{secrets.token_hex(8)}"
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._polling: set[int] = set()  # slots that have logged falling back to polling
        self._ready: set[int] = set()
        self._announced = False
        self._stopping = asyncio.Event()
        self._status = EXIT_OK
        self._log: Any = structlog.get_logger("echo_async.supervisor")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        endpoint = await self._start_metrics()
        notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notifications.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notifications.setblocking(False)
        address = self._notify_address
        notifications.bind("\0" + address[1:] if address.startswith("@") else address)
        loop.add_reader(notifications.fileno(), self._read_notifications, notifications)
        handled = (signal.SIGTERM, signal.SIGINT)
        for signum in handled:
            loop.add_signal_handler(signum, self._on_signal, signum)
        self._log.info("supervisor started", pid=os.getpid(), workers=self.service.workers)
        slots = [asyncio.create_task(self._supervise(i)) for i in range(self.service.workers)]
        try:
            await self._stopping.wait()
            service = self.service
            limit_s = service.drain_delay + service.server.shutdown_timeout + SHUTDOWN_MARGIN_S
            _, late = await asyncio.wait(slots, timeout=limit_s)
            if late:
                self._log.error("workers did not exit in time, killing them", timeout_s=limit_s)
                self._status = EXIT_FAILURE
                self._signal_all(signal.SIGKILL)
            await asyncio.gather(*slots)
        finally:
            for task in slots:
                task.cancel()
            await asyncio.gather(*slots, return_exceptions=True)
            for process in self._workers.values():  # only after an error: don't leave orphans
                process.kill()
                process.wait()
            for signum in handled:
                loop.remove_signal_handler(signum)
            loop.remove_reader(notifications.fileno())
            notifications.close()
            if endpoint is not None:
                await endpoint.close()
        self._log.info("supervisor exiting", status=self._status)
        return self._status

    async def _start_metrics(self) -> MetricsEndpoint | None:
        if self._metrics_directory is None:
            return None
        registry = CollectorRegistry()
        # prometheus_client's multiprocess module has no annotations.
        MultiProcessCollector(registry, path=self._metrics_directory)  # type: ignore[no-untyped-call]
        host, port = parse_host_port(self.service.metrics, "--metrics")
        endpoint = MetricsEndpoint(host, port, registry, self._healthy)
        try:
            await endpoint.start()
        except OSError as error:
            raise StartupError(
                f"--metrics: cannot listen on {self.service.metrics}: {os_reason(error)}"
            ) from None
        return endpoint

    def _healthy(self) -> bool:
        return bool(self._ready) and not self._stopping.is_set()

    async def _supervise(self, index: int) -> None:
        """Keep worker `index` running until the supervisor stops, or it crash-loops.

        An unexpected error stops the supervisor (status 1) rather than ending the slot
        silently; the slot still waits for its worker, so that worker drains like the others.
        """
        try:
            await self._keep_running(index)
        except Exception:
            self._log.exception("worker supervision failed, stopping", index=index)
            self._stop(EXIT_FAILURE)
            process = self._workers.get(index)
            if process is not None:
                self._exited(index, process, await self._poll(process))

    async def _keep_running(self, index: int) -> None:
        budget = RestartBudget()
        restarted = False
        while True:
            try:
                process = self._spawn(index)
            except (OSError, subprocess.SubprocessError) as error:
                self._log.error("cannot start a worker", index=index, error=str(error))
                self._stop(EXIT_FAILURE)
                return
            event = "worker restarted" if restarted else "worker started"
            self._log.info(event, index=index, pid=process.pid)
            status = await self._wait(index, process)
            self._exited(index, process, status)
            if self._stopping.is_set():
                return
            delay = budget.next_delay(time.monotonic())
            if delay is None:
                self._log.error(
                    "worker keeps dying, stopping",
                    index=index,
                    restarts=MAX_RESTARTS,
                    window_s=RESTART_WINDOW_S,
                )
                self._stop(EXIT_FAILURE)
                return
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                    return
            restarted = True

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        environment = worker_environment(
            os.environ, index, self._notify_address, self._metrics_directory
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "echo_async", "serve", "--config", str(self._config_path)],
            env=environment,
            # Signals are the supervisor's to forward: a terminal's Ctrl-C reaches only it.
            process_group=0,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self._workers[index] = process
        if self._stopping.is_set():
            os.kill(process.pid, signal.SIGTERM)
        return process

    async def _wait(self, index: int, process: subprocess.Popen[bytes]) -> int:
        """Wait for worker `index` to exit and reap it; return the status. Raises no OSError.

        A pidfd wakes the loop at the exit. Without one (EMFILE, ENFILE, ENOMEM, no pidfd
        support) the slot polls instead, and says so once: it must go on supervising.
        """
        try:
            await _wait_on_pidfd(process.pid)
        except OSError as error:
            if index not in self._polling:
                self._polling.add(index)
                self._log.warning(
                    "cannot wait on a worker's pidfd, polling instead",
                    index=index,
                    pid=process.pid,
                    error=os_reason(error),
                    interval_s=EXIT_POLL_INTERVAL_S,
                )
            return await self._poll(process)
        return process.wait()

    async def _poll(self, process: subprocess.Popen[bytes]) -> int:
        """Reap `process` once it has exited, checking every EXIT_POLL_INTERVAL_S."""
        # Polling is the point: this is the way to wait that needs no file descriptor.
        while (status := process.poll()) is None:  # noqa: ASYNC110
            await asyncio.sleep(EXIT_POLL_INTERVAL_S)
        return status

    def _exited(self, index: int, process: subprocess.Popen[bytes], status: int) -> None:
        del self._workers[index]
        self._ready.discard(process.pid)
        if self._metrics_directory is not None:
            mark_process_dead(process.pid, self._metrics_directory)  # type: ignore[no-untyped-call]
        fields: dict[str, Any] = {"index": index, "pid": process.pid, "status": status}
        if status < 0:
            fields["signal"] = signal.Signals(-status).name
        if self._stopping.is_set():
            self._log.info("worker exited", **fields)
        else:
            self._log.warning("worker exited", **fields)

    def _read_notifications(self, notifications: socket.socket) -> None:
        """sd_notify datagrams from the workers; the kernel vouches for the sender's pid."""
        while True:
            try:
                data, ancillary, _, _ = notifications.recvmsg(
                    4096, socket.CMSG_SPACE(_CREDENTIALS.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _CREDENTIALS.unpack_from(payload)[0]
            index = next((i for i, p in self._workers.items() if p.pid == pid), None)
            if index is not None and b"READY=1" in data.split(b"\n"):
                self._worker_ready(index, pid)

    def _worker_ready(self, index: int, pid: int) -> None:
        self._ready.add(pid)
        self._log.info("worker ready", index=index, pid=pid)
        if not self._announced and len(self._ready) == self.service.workers:
            self._announced = True
            systemd.notify("READY=1")
            host = self.service.server.host
            self._log.info("workers ready", workers=len(self._ready), address=f"{host}:{self.port}")

    def _on_signal(self, signum: signal.Signals) -> None:
        if not self._stopping.is_set():
            self._log.info("signal received, stopping workers", signal=signum.name)
            self._stop(EXIT_OK)
        elif signum == signal.SIGINT:
            self._log.warning("second SIGINT, workers abort open connections")
            self._status = EXIT_ABORTED
            self._signal_all(signal.SIGINT)
        else:
            # A worker's second SIGTERM ends its --drain-delay, as for a single process.
            self._log.info("second SIGTERM, workers stop delaying their drain")
            self._signal_all(signal.SIGTERM)

    def _stop(self, status: int) -> None:
        """Stop restarting and let every worker drain (SIGTERM); `status` is the exit status."""
        if self._stopping.is_set():
            return
        self._status = status
        self._stopping.set()
        systemd.notify("STOPPING=1")
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: signal.Signals) -> None:
        for process in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)


async def _wait_on_pidfd(pid: int) -> None:
    """Return once process `pid` has exited (its pidfd becomes readable); don't reap it."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    pidfd = os.pidfd_open(pid)
    try:
        loop.add_reader(pidfd, on_exit)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: SIGTERM the worker when the supervisor dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)

    def set_parent_death_signal() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before prctl: nothing would signal us
            os._exit(EXIT_FAILURE)

    return set_parent_death_signal
