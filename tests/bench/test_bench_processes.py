"""--processes: connections spread over worker processes, results merged exactly."""

from __future__ import annotations

from echo_async.bench import BenchConfig, run_bench


async def test_two_processes_merge_counts_and_histograms(echo_port: int) -> None:
    config = BenchConfig(
        mode="pingpong", connections=6, size=512, requests=3001, processes=2, port=echo_port
    )
    result = await run_bench(config)
    assert result.ok, result.problems()
    assert result.round_trips == 3001
    assert result.latency.total == 3001
    assert sum(interval.latency.total for interval in result.intervals) == 3001
    assert result.connections_made == 6


async def test_processes_catch_corruption(corrupting_port: int) -> None:
    config = BenchConfig(
        mode="pingpong", connections=4, size=64, duration=0.4, processes=2, port=corrupting_port
    )
    result = await run_bench(config)
    assert result.mismatched_bytes == 4
    assert result.first_mismatch is not None
