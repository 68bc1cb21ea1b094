"""``python -m echo_async.bench.worker``: one process of a ``--processes N`` run.

Not for people: the parent (:mod:`echo_async.bench.runner`) speaks to it in JSON lines.
stdin: the share's BenchConfig, then "go". stdout: {"ready": true}, {"sample": ...} per tick,
{"summary": ...} at the end. SIGTERM or SIGINT end the run early, still with a summary.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from dataclasses import asdict

from echo_async.bench.config import BenchConfig
from echo_async.bench.driver import Driver, Sample, ShareSummary
from echo_async.bench.runner import new_event_loop


def _send(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _emit(sample: Sample) -> None:
    _send({"sample": sample.to_dict()})


async def _run(config: BenchConfig) -> ShareSummary:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    return await Driver(config, _emit, stop).run()


def main() -> int:
    """Run one share; the exit status is 0 unless the parent's protocol was broken."""
    line = sys.stdin.readline()
    if not line:
        return 2
    config = BenchConfig(**json.loads(line))
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        _send({"ready": True})
        if sys.stdin.readline().strip() != "go":
            return 2
        summary = runner.run(_run(config))
    _send({"summary": asdict(summary)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
