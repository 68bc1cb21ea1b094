"""The `echo-async serve` run path of one process: signals, metrics endpoint, systemd, drain.

This is the application around the library's EchoServer: it alone installs signal handlers and
the loop's exception filter. `run_service` returns the exit status; a problem the user can fix
(busy port, bad address) raises StartupError, which the CLI prints as one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import signal
import socket
import time
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from echo_async import __version__, systemd
from echo_async.config import (
    WORKER_ENVIRONMENT_VARIABLE,
    ConfigError,
    ServerConfig,
    ServiceConfig,
    parse_host_port,
)

__all__ = ["WORKER_ENVIRONMENT_VARIABLE", "StartupError", "run_service"]
from echo_async.loops import LoopChoice
from echo_async.metrics import MetricsEndpoint, ServerMetrics
from echo_async.server import EchoServer

EXIT_OK = 0
EXIT_ABORTED = 128 + signal.SIGINT
# Set by the supervisor for its workers: where prometheus_client keeps per-process values.
MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"

_DESCRIPTOR_ERRNOS = (errno.EMFILE, errno.ENFILE)
_MEMORY_ERRNOS = (errno.ENOBUFS, errno.ENOMEM)


class StartupError(Exception):
    """The service could not start for a reason the user can fix; `str()` is one line."""


def os_reason(error: OSError) -> str:
    """The OS's words for an error, without asyncio's wrapping ("error while attempting...")."""
    if isinstance(error, socket.gaierror) or not error.errno or error.errno < 0:
        return (error.strerror or str(error)).lower()
    return os.strerror(error.errno).lower()


def run_service(service: ServiceConfig, loop: LoopChoice) -> int:
    """Run one server process until SIGTERM/SIGINT and its drain; return the exit status."""
    with asyncio.Runner(loop_factory=loop.factory) as runner:
        return runner.run(_serve(service, loop.name))


async def _serve(service: ServiceConfig, loop_name: str) -> int:
    log = structlog.get_logger("echo_async.service")
    loop = asyncio.get_running_loop()
    metrics = None
    if service.metrics or os.environ.get(MULTIPROCESS_DIRECTORY):
        metrics = ServerMetrics(CollectorRegistry())
    loop.set_exception_handler(ResourceErrorFilter(log, metrics))
    config = service.server
    server = EchoServer(config, sockets=systemd.listen_fds(), metrics=metrics)
    try:
        await server.start()
    except ConfigError as error:
        raise StartupError(str(error)) from None
    except OSError as error:
        raise StartupError(
            f"cannot listen on {_where(config, error)}: {os_reason(error)}"
        ) from None
    endpoint = None
    draining = False
    if service.metrics and metrics is not None:
        host, port = parse_host_port(service.metrics, "--metrics")
        endpoint = MetricsEndpoint(
            host, port, metrics.registry, lambda: server.is_serving and not draining
        )
        try:
            await endpoint.start()
        except OSError as error:
            await server.close(timeout=0)
            raise StartupError(
                f"--metrics: cannot listen on {service.metrics}: {os_reason(error)}"
            ) from None
    log.info("serving", loop=loop_name, version=__version__, pid=os.getpid())
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second signal: no more waiting for the drain delay
    status = EXIT_OK

    def on_signal(signum: signal.Signals) -> None:
        nonlocal status
        if not stop.is_set():
            log.info("signal received, draining", signal=signum.name)
            stop.set()
            return
        hurry.set()
        if signum == signal.SIGINT:
            log.warning("second SIGINT, aborting open connections", signal=signum.name)
            status = EXIT_ABORTED
            server.abort_connections()

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        systemd.notify("READY=1")
        await stop.wait()
        systemd.notify("STOPPING=1")
        if service.drain_delay:
            # Still accepting and serving, but /healthz says 503: a balancer that checks it
            # stops sending new connections before they could meet a closed listener.
            draining = True
            log.info("failing health checks before closing", drain_delay_s=service.drain_delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), service.drain_delay)
        await server.close()
        if endpoint is not None:
            await endpoint.close()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    log.info("exiting", status=status)
    return status


def _where(config: ServerConfig, error: OSError) -> str:
    """The listener that failed: `host:port` in the short form, else the URL the server named."""
    if not config.listen:
        return f"{config.host}:{config.port}"
    return str(error.filename) if error.filename is not None else ", ".join(config.listen)


class ResourceErrorFilter:
    """The loop's exception handler: resource errors become counted one-line warnings.

    asyncio's selector loop answers EMFILE on accept with one report and one retry timer per
    backlog slot; timers still pending when the server closes then fail on the closed socket
    ("Invalid file descriptor: -1" in `_start_serving`). Both are noise about a condition the
    server already reports once per episode (see limits.DescriptorWatch), so they are dropped.
    ENOBUFS and ENOMEM (the kernel out of memory for sockets) are counted in
    `echo_resource_errors_total{errno}` and logged, at most once a second. Everything else goes
    to the default handler.
    """

    def __init__(self, log: Any, metrics: ServerMetrics | None) -> None:
        self.log = log
        self.metrics = metrics
        self.counts: dict[str, int] = {}
        self._logged_at = -math.inf
        self._unlogged = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        if isinstance(exception, OSError) and exception.errno in _DESCRIPTOR_ERRNOS:
            return
        if isinstance(exception, OSError) and exception.errno in _MEMORY_ERRNOS:
            name = errno.errorcode[exception.errno]
            self.counts[name] = self.counts.get(name, 0) + 1
            if self.metrics is not None:
                self.metrics.resource_error(name)
            self._unlogged += 1
            now = time.monotonic()
            if now - self._logged_at >= 1.0:
                self.log.warning(
                    "the kernel is out of memory for sockets",
                    errno=name,
                    errors=self._unlogged,
                    message=str(context.get("message", "")),
                )
                self._logged_at = now
                self._unlogged = 0
            return
        if isinstance(exception, ValueError) and "_start_serving" in repr(context.get("handle")):
            return
        loop.default_exception_handler(context)
