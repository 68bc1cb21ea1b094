"""run_bench: one load test, in this process or spread over ``--processes`` worker processes.

Workers are ``python -m echo_async.bench.worker`` subprocesses: each gets its share of the
configuration as one JSON line on stdin, says it is ready, waits for "go" (so all start
together), then streams its samples and a final summary as JSON lines on stdout. The parent
merges them exactly (histograms add bucket by bucket) into one :class:`BenchResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from echo_async.bench.config import BenchConfig
from echo_async.bench.counters import cannot_resolve
from echo_async.bench.driver import Driver, Sample, ShareSummary
from echo_async.bench.result import Aggregate, BenchResult, Progress
from echo_async.loops import choose_loop

ProgressCallback = Callable[[Progress], None]
WORKER_LINE_LIMIT = 16 * 1024 * 1024  # a sample carries a sparse histogram: lines can be long
WORKER_START_TIMEOUT_S = 60.0


class BenchError(Exception):
    """The run could not be carried out (for example a worker process died)."""


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it can be imported (the client is then much faster), else asyncio's."""
    return choose_loop("auto").factory()


async def run_bench(
    config: BenchConfig,
    *,
    progress: ProgressCallback | None = None,
    stop: asyncio.Event | None = None,
) -> BenchResult:
    """Run the load test ``config`` describes and return its result.

    Runs in the current event loop (so a test may serve from the same loop) unless
    ``config.processes`` > 1. ``progress`` is called with the state so far after every sample;
    setting ``stop`` ends the run early, with the result of what ran. Raises BenchError when
    the run cannot be carried out: ``config.host`` does not resolve, a worker process died.
    """
    await _check_host(config)
    aggregate = Aggregate(config)

    def on_sample(process: int, sample: Sample) -> None:
        aggregate.add(process, sample)
        if progress is not None:
            progress(aggregate.progress())

    if config.processes == 1:
        driver = Driver(config, lambda sample: on_sample(0, sample), stop)
        summaries = [await driver.run()]
    else:
        summaries = await _run_workers(config, on_sample, stop)
    return aggregate.result(summaries)


async def _check_host(config: BenchConfig) -> None:
    """Raise BenchError, before any load, when --host does not resolve.

    Connections still resolve the name each time (DNS round robin spreads them), but a name
    that resolves to nothing is one clear line, not an error count with no echo behind it.
    """
    if config.unix_path is not None:
        return
    kind = socket.SOCK_DGRAM if config.udp else socket.SOCK_STREAM
    try:
        async with asyncio.timeout(config.timeout):
            await asyncio.get_running_loop().getaddrinfo(config.host, config.port, type=kind)
    except socket.gaierror as exc:
        raise BenchError(cannot_resolve(config.host, exc)) from None
    except TimeoutError:
        message = f"cannot resolve {config.host}: no answer within {config.timeout:g}s"
        raise BenchError(message) from None


def _worker_environment() -> dict[str, str]:
    """Our environment, with this copy of echo_async importable even when not installed."""
    root = str(Path(__file__).resolve().parents[2])
    environment = dict(os.environ)
    paths = environment.get("PYTHONPATH", "")
    environment["PYTHONPATH"] = root + (os.pathsep + paths if paths else "")
    return environment


async def _run_workers(
    config: BenchConfig,
    on_sample: Callable[[int, Sample], None],
    stop: asyncio.Event | None,
) -> list[ShareSummary]:
    count = config.processes
    workers: list[asyncio.subprocess.Process] = []
    watcher: asyncio.Task[None] | None = None
    try:
        for index in range(count):
            worker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "echo_async.bench.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=_worker_environment(),
                limit=WORKER_LINE_LIMIT,
            )
            workers.append(worker)
            share = config.share(index, count)
            _pipes(worker)[0].write(json.dumps(share.to_dict()).encode() + b"\n")
        async with asyncio.timeout(WORKER_START_TIMEOUT_S):
            for index, worker in enumerate(workers):
                if await _read(worker) != {"ready": True}:
                    raise BenchError(f"bench worker {index} did not start")
        for worker in workers:
            _pipes(worker)[0].write(b"go\n")
        if stop is not None:
            watcher = asyncio.get_running_loop().create_task(_signal_on(stop, workers))
        return list(
            await asyncio.gather(
                *(_collect(index, worker, on_sample) for index, worker in enumerate(workers))
            )
        )
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for worker in workers:
            if worker.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.kill()
            await worker.wait()


def _pipes(
    worker: asyncio.subprocess.Process,
) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
    assert worker.stdin is not None
    assert worker.stdout is not None
    return worker.stdin, worker.stdout


async def _read(worker: asyncio.subprocess.Process) -> Any:
    line = await _pipes(worker)[1].readline()
    return json.loads(line) if line else None


async def _signal_on(stop: asyncio.Event, workers: list[asyncio.subprocess.Process]) -> None:
    await stop.wait()
    for worker in workers:
        if worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGTERM)


async def _collect(
    index: int,
    worker: asyncio.subprocess.Process,
    on_sample: Callable[[int, Sample], None],
) -> ShareSummary:
    while True:
        message = await _read(worker)
        if message is None:
            status = await worker.wait()
            raise BenchError(f"bench worker {index} exited (status {status}) before finishing")
        if "sample" in message:
            on_sample(index, Sample.from_dict(message["sample"]))
        elif "summary" in message:
            await worker.wait()
            return ShareSummary(**message["summary"])
