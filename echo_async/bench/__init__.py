"""The echo-async load tester (``echo-async bench``), usable from Python too.

from echo_async.bench import BenchConfig, run_bench
result = await run_bench(BenchConfig(mode="pingpong", connections=10, size=1024,
                                     duration=5, port=7))
result.round_trips_per_s, result.latency_ms()["p99"], result.ok
"""

from echo_async.bench.config import BenchConfig, BenchConfigError
from echo_async.bench.result import BenchResult
from echo_async.bench.runner import BenchError, run_bench

__all__ = ["BenchConfig", "BenchConfigError", "BenchError", "BenchResult", "run_bench"]
