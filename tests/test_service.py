"""The service's loop exception handler: resource errors are counted and said, never silent."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from echo_async.metrics import ServerMetrics
from echo_async.service import ResourceErrorFilter


def error_context(code: int) -> dict[str, Any]:
    return {"message": "socket.accept() out of system resource", "exception": OSError(code, "x")}


async def test_kernel_memory_errors_are_counted_and_logged(logs: list[dict[str, Any]]) -> None:
    metrics = ServerMetrics(CollectorRegistry())
    handler = ResourceErrorFilter(structlog.get_logger("echo_async.service"), metrics)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        handler(loop, error_context(errno.ENOBUFS))
    handler(loop, error_context(errno.ENOMEM))
    sample = metrics.registry.get_sample_value
    assert sample("echo_resource_errors_total", {"errno": "ENOBUFS"}) == 3
    assert sample("echo_resource_errors_total", {"errno": "ENOMEM"}) == 1
    warnings = [record for record in logs if record["log_level"] == "warning"]
    assert warnings  # said, at most once a second
    assert warnings[0]["errno"] == "ENOBUFS"
    assert handler.counts == {"ENOBUFS": 3, "ENOMEM": 1}


async def test_descriptor_exhaustion_is_left_to_the_server_and_the_rest_reaches_the_default(
    logs: list[dict[str, Any]],
) -> None:
    handler = ResourceErrorFilter(structlog.get_logger("echo_async.service"), None)
    loop = asyncio.get_running_loop()
    defaults: list[dict[str, Any]] = []
    loop.default_exception_handler = defaults.append  # type: ignore[method-assign]
    handler(loop, error_context(errno.EMFILE))
    assert not defaults
    assert not logs
    handler(loop, error_context(errno.ECONNREFUSED))
    assert len(defaults) == 1
