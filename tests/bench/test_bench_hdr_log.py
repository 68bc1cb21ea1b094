"""--hdr-log and the HdrHistogram hand-over: the log reads back with HdrHistogram's own readers,
and the reported percentiles are the package's, equal to the bench histogram's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader
from hypothesis import given
from hypothesis import strategies as st

from echo_async.bench import BenchConfig, BenchResult, cli, hdr, run_bench
from echo_async.bench.driver import TICK_S, Sample
from echo_async.bench.histogram import Histogram
from echo_async.bench.result import Aggregate
from tests.bench.test_bench_cli import parse, run

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}
HIGHEST_NS = hdr.highest_trackable_ns(10.0)
HEADER = [
    r"#\[Logged with echo-async bench \S+\]",
    r"#\[pingpong: 2 connections x 1024 bytes, tcp://127\.0\.0\.1:\d+\]",
    r"#\[Values: latency in nanoseconds, up to \d+; Interval_Max: milliseconds\]",
    r"#\[Histogram log format version 1\.\d+\]",
    r"#\[StartTime: (\d+\.\d{3}) \(seconds since epoch\), \d{4}-\d\d-\d\d \S+\]",
    r"#\[BaseTime: (\d+\.\d+) \(seconds since epoch\)\]",
    r'"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"',
]


def pingpong(port: int, *extra: str) -> list[str]:
    return ["--port", str(port), "--mode", "pingpong", "--connections", "2", "--size", "1KiB",
            "--duration", "0.6", "--quiet", *extra]  # fmt: skip


def read_log(path: Path) -> tuple[list[Any], HistogramLogReader]:
    """Every interval histogram in ``path``, read by the package's HistogramLogReader."""
    reader = HistogramLogReader(str(path), HdrHistogram(1, HIGHEST_NS, 2))
    intervals = []
    try:
        while (interval := reader.get_next_interval_histogram()) is not None:
            intervals.append(interval)
    finally:
        reader.close()
    return intervals, reader


def merged(intervals: list[Any]) -> Any:
    total = HdrHistogram(1, HIGHEST_NS, 2)
    for interval in intervals:
        total.add(interval)
    return total


def latency_ms(histogram: Any) -> dict[str, float]:
    values = {name: histogram.get_value_at_percentile(p) for name, p in PERCENTILES.items()}
    values["max"] = histogram.get_max_value()
    return {name: value / 1e6 for name, value in values.items()}


@pytest.mark.parametrize("processes", [1, 2])
async def test_the_log_reads_back_and_agrees_with_the_json(
    echo_port: int, tmp_path: Path, processes: int
) -> None:
    log, result_file = tmp_path / "run.hlog", tmp_path / "run.json"
    argv = pingpong(echo_port, "--hdr-log", str(log), "--json", str(result_file),
                    "--processes", str(processes))  # fmt: skip
    assert await run(argv) == 0
    result = json.loads(result_file.read_text())
    lines = log.read_text().splitlines()
    for pattern, line in zip(HEADER, lines, strict=False):
        assert re.fullmatch(pattern, line), (pattern, line)
    start = re.fullmatch(HEADER[4], lines[4])
    base = re.fullmatch(HEADER[5], lines[5])
    assert start is not None
    assert base is not None
    assert float(start[1]) == pytest.approx(float(base[1]), abs=1e-6)

    intervals, reader = read_log(log)
    assert reader.get_start_time_sec() == float(start[1])
    # One interval per quarter second of the run, from 0 to its end. (A tick the event loop
    # was too late for is skipped, so count ticks rather than lines.)
    offsets = [interval.get_start_time_stamp() / 1000 - float(start[1]) for interval in intervals]
    ticks = [round(offset / TICK_S) for offset in offsets]
    assert offsets == pytest.approx([tick * TICK_S for tick in ticks], abs=1e-3)
    assert ticks == sorted(set(ticks))
    assert ticks[0] == 0
    assert ticks[-1] == math.ceil(result["duration_s"] / TICK_S - 1e-6) - 1
    end = intervals[-1].get_end_time_stamp() / 1000 - float(start[1])
    assert end == pytest.approx(result["duration_s"], abs=1e-3)
    # Interval_Max is informational (readers take the maximum from the histogram);
    # hdrhistogram 0.10.8 floors it to whole milliseconds.
    for line, interval in zip(lines[len(HEADER) :], intervals, strict=True):
        assert 0 <= float(line.split(",")[2]) <= interval.get_max_value() / 1e6

    total = merged(intervals)
    assert total.get_total_count() == result["round_trips"] > 0
    assert latency_ms(total) == pytest.approx(result["latency_ms"], abs=1e-6)


def test_a_known_result_reads_back_interval_by_interval(tmp_path: Path) -> None:
    result = result_of([[1_000, 2_000, 2_000], [], [5_000_000]], started_at=1_700_000_000.0)
    path = tmp_path / "fixed.hlog"
    hdr.write_log(path, result)
    intervals, reader = read_log(path)
    assert reader.get_start_time_sec() == 1_700_000_000.0
    assert [interval.get_total_count() for interval in intervals] == [3, 0, 1]
    assert [interval.get_max_value() for interval in intervals] == [2_007, 0, 5_013_503]
    assert [interval.get_start_time_stamp() for interval in intervals] == pytest.approx(
        [1_700_000_000_000.0, 1_700_000_000_250.0, 1_700_000_000_500.0]
    )


def result_of(intervals: list[list[int]], *, started_at: float) -> BenchResult:
    """A BenchResult with one interval per list of latencies (nanoseconds)."""
    config = BenchConfig(mode="pingpong", connections=1, size=64, duration=1, port=7)
    aggregate = Aggregate(config)
    for tick, values in enumerate(intervals):
        histogram = Histogram.from_values(values)
        sample = Sample(
            tick=tick,
            elapsed_s=(tick + 1) * TICK_S,
            round_trips=len(values),
            echoed_bytes=64 * len(values),
            connections_made=0,
            connections_open=1,
            errors=0,
            mismatched_bytes=0,
            latency=histogram.sparse(),
        )
        aggregate.add(0, sample)
    aggregate.started_at = started_at
    return aggregate.result([])


@pytest.mark.parametrize("processes", [1, 2])
async def test_one_log_line_per_interval_of_the_merged_run(
    echo_port: int, tmp_path: Path, processes: int
) -> None:
    config = BenchConfig(
        mode="pingpong", connections=4, size=256, requests=4000, processes=processes,
        port=echo_port,
    )  # fmt: skip
    result = await run_bench(config)
    assert result.ok, result.problems()
    path = tmp_path / "run.hlog"
    hdr.write_log(path, result)
    intervals, reader = read_log(path)
    assert len(intervals) == len(result.intervals) > 0
    started = reader.get_start_time_sec()
    for read, interval in zip(intervals, result.intervals, strict=True):
        assert read.get_total_count() == interval.latency.total
        # The log has microseconds; the epoch in a float keeps about that much too.
        offsets = [
            read.get_start_time_stamp() / 1000 - started,
            read.get_end_time_stamp() / 1000 - started,
        ]
        assert offsets == pytest.approx([interval.start_s, interval.end_s], abs=1e-5)
    total = merged(intervals)
    assert total.get_total_count() == result.round_trips == 4000
    assert latency_ms(total) == pytest.approx(result.latency_ms(), abs=1e-6)


async def test_hold_logs_its_empty_intervals_too(echo_port: int, tmp_path: Path) -> None:
    config = BenchConfig(mode="hold", connections=3, size=64, duration=0.6, port=echo_port)
    result = await run_bench(config)
    assert result.ok, result.problems()
    path = tmp_path / "hold.hlog"
    hdr.write_log(path, result)
    intervals, _ = read_log(path)
    assert len(intervals) == len(result.intervals) >= 2
    assert sum(interval.get_total_count() for interval in intervals) == 3
    assert any(interval.get_total_count() == 0 for interval in intervals)


@given(st.lists(st.integers(min_value=0, max_value=HIGHEST_NS), min_size=1, max_size=200))
def test_the_hand_over_is_exact(values: list[int]) -> None:
    histogram = Histogram.from_values(values)
    converted, clamped = hdr.to_hdr(histogram, HIGHEST_NS)
    assert clamped == 0
    assert converted.get_total_count() == len(values)
    for percent in (0.1, 50.0, 90.0, 99.0, 99.9, 100.0):
        assert converted.get_value_at_percentile(percent) == histogram.percentile(percent)
    assert converted.get_max_value() == histogram.max


def test_values_above_the_range_are_clamped_and_counted() -> None:
    histogram = Histogram.from_values([5_000, 3 * HIGHEST_NS, 10 * HIGHEST_NS])
    converted, clamped = hdr.to_hdr(histogram, HIGHEST_NS)
    assert clamped == 2
    assert converted.get_total_count() == 3
    assert HIGHEST_NS <= converted.get_max_value() <= HIGHEST_NS * 1.01


def test_the_range_covers_the_timeout_and_a_tick_twice() -> None:
    assert hdr.highest_trackable_ns(10.0) == 2 * (10 + TICK_S) * 10**9
    assert hdr.highest_trackable_ns(1e-12) >= 2 * TICK_S * 10**9


async def test_latencies_beyond_the_range_warn_and_are_noted_in_the_log(
    echo_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(hdr, "highest_trackable_ns", lambda timeout_s: 1_000)
    log, result_file = tmp_path / "run.hlog", tmp_path / "run.json"
    assert await run(pingpong(echo_port, "--hdr-log", str(log), "--json", str(result_file))) == 0
    result = json.loads(result_file.read_text())
    err = capsys.readouterr().err
    assert err == (
        f"echo-async bench: warning: {result['round_trips']} latencies were above 1e-06s, the "
        "top of the histogram's range, and are counted as 1e-06s\n"
    )
    assert f"#[{result['round_trips']} latencies above 1000 ns are recorded as 1000 ns]\n" in (
        log.read_text()
    )
    # The top bucket's highest value, as for any value recorded there.
    assert result["latency_ms"]["max"] == Histogram.from_values([1_000]).max / 1e6


@pytest.mark.parametrize(
    ("where", "message"),
    [("missing/run.hlog", "does not exist"), (".", "is a directory")],
)
def test_a_log_path_that_cannot_be_written_is_one_line_and_exit_2_before_any_load(
    tmp_path: Path, where: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 7 has no server: a check made after the load would show its errors instead.
    path = tmp_path / where
    argv = ["--port", "7", "--mode", "pingpong", "--connections", "1", "--size", "64",
            "--duration", "1", "--hdr-log", str(path)]  # fmt: skip
    assert cli.run(parse(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"echo-async bench: error: --hdr-log {path}: ")
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_a_log_that_fails_while_writing_is_one_line_and_exit_2(
    echo_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run(pingpong(echo_port, "--hdr-log", "/dev/full")) == 2
    assert capsys.readouterr().err == (
        "echo-async bench: error: cannot write /dev/full: No space left on device\n"
    )
