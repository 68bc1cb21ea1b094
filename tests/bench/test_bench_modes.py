"""Each mode and transport against a real server in the test's own loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from echo_async.bench import BenchConfig, BenchResult, run_bench
from echo_async.bench.config import Mode
from echo_async.bench.driver import Driver
from echo_async.bench.result import Progress

SHORT = 0.4


async def bench(**fields: Any) -> BenchResult:
    fields.setdefault("size", 1024)
    fields.setdefault("connections", 4)
    if "requests" not in fields:
        fields.setdefault("duration", SHORT)
    return await run_bench(BenchConfig(**fields))


def assert_clean(result: BenchResult) -> None:
    assert result.errors == 0, result.error_kinds
    assert result.mismatched_bytes == 0, result.first_mismatch
    assert result.ok, result.problems()


def assert_latency_matches(result: BenchResult) -> None:
    """Every round trip is in the histogram, and per-interval histograms sum to it."""
    assert result.latency.total == result.round_trips
    assert sum(interval.latency.total for interval in result.intervals) == result.round_trips
    latency = result.latency_ms()
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p999"]
    assert latency["p999"] <= latency["max"]


async def test_pingpong_measures_round_trips(echo_port: int) -> None:
    result = await bench(mode="pingpong", port=echo_port)
    assert_clean(result)
    assert result.round_trips > 100
    assert result.echoed_bytes == result.round_trips * 1024
    assert result.duration_s >= SHORT
    assert_latency_matches(result)


async def test_pingpong_with_requests_does_exactly_that_many(echo_port: int) -> None:
    result = await bench(mode="pingpong", port=echo_port, requests=777, connections=5)
    assert_clean(result)
    assert result.round_trips == 777
    assert_latency_matches(result)


async def test_messages_larger_than_one_read_are_reassembled(echo_port: int) -> None:
    result = await bench(mode="pingpong", port=echo_port, size=300_000, connections=2)
    assert_clean(result)
    assert result.round_trips > 0
    assert result.echoed_bytes >= result.round_trips * 300_000


async def test_pipeline_keeps_several_messages_in_flight(echo_port: int) -> None:
    result = await bench(mode="pingpong", port=echo_port, pipeline=8, requests=2000)
    assert_clean(result)
    assert result.round_trips == 2000
    assert_latency_matches(result)


async def test_rate_paces_round_trips(echo_port: int) -> None:
    result = await bench(mode="pingpong", port=echo_port, rate=200.0, duration=0.5)
    assert_clean(result)
    # 200/s for 0.5 s: about 100, give or take the first due time of each connection.
    assert 80 <= result.round_trips <= 110
    assert_latency_matches(result)


async def test_stream_measures_echoed_bytes(echo_port: int) -> None:
    result = await bench(mode="stream", port=echo_port, size=16384, connections=2)
    assert_clean(result)
    assert result.echoed_bytes > 1_000_000
    assert result.echoed_bytes_per_s > 0


async def test_oneshot_opens_a_connection_per_round_trip(echo_port: int) -> None:
    result = await bench(mode="oneshot", port=echo_port, size=64, requests=200)
    assert_clean(result)
    assert result.round_trips == 200
    assert result.connections_made == 200
    assert result.connections_per_s > 0


async def test_hold_opens_every_connection_and_echoes_once(echo_port: int) -> None:
    result = await bench(mode="hold", port=echo_port, size=64, connections=300, duration=0.5)
    assert_clean(result)
    assert result.round_trips == 300
    assert result.connections_made == 300
    assert result.intervals[-1].connections_open == 300


async def test_hold_reports_connections_it_could_not_open(unused_tcp_port: int) -> None:
    result = await bench(mode="hold", port=unused_tcp_port, size=64, connections=20)
    assert not result.ok
    assert result.round_trips == 0
    assert result.errors == 20
    assert any("refused" in kind for kind in result.error_kinds)
    assert any("only 0 of 20" in problem for problem in result.problems())


async def test_unix_socket(unix_path: str) -> None:
    result = await bench(mode="pingpong", unix_path=unix_path)
    assert_clean(result)
    assert result.round_trips > 100
    assert result.target == f"unix://{unix_path}"


async def test_udp_pingpong(udp_port: int) -> None:
    result = await bench(mode="pingpong", udp=True, port=udp_port, size=512, requests=500)
    assert_clean(result)
    assert result.round_trips == 500
    assert result.target.startswith("udp://")


async def test_tls_accepts_a_self_signed_server_by_default(tls_port: int) -> None:
    result = await bench(mode="pingpong", tls=True, port=tls_port, requests=200)
    assert_clean(result)
    assert result.round_trips == 200


async def test_tls_verifies_with_a_ca(tls_port: int, ca_file: str) -> None:
    result = await bench(mode="oneshot", tls=True, tls_ca=ca_file, port=tls_port, requests=20)
    assert_clean(result)


async def test_corrupted_bytes_are_counted(corrupting_port: int) -> None:
    result = await bench(mode="pingpong", port=corrupting_port, connections=3)
    # The server flips byte 5 of each connection's stream: one bad byte per connection.
    assert result.mismatched_bytes == 3
    assert result.first_mismatch is not None
    assert "message byte 5" in result.first_mismatch
    assert not result.ok
    assert result.to_json()["mismatched_bytes"] == 3


async def test_corruption_is_caught_in_every_mode(corrupting_port: int) -> None:
    for mode, extra in (("stream", {}), ("oneshot", {"requests": 10}), ("hold", {})):
        result = await bench(mode=mode, port=corrupting_port, size=64, connections=2, **extra)
        assert result.mismatched_bytes > 0, mode
        assert not result.ok


async def test_a_server_that_never_echoes_times_out(silent_port: int) -> None:
    result = await bench(mode="pingpong", port=silent_port, requests=10, timeout=0.3)
    assert not result.ok
    assert result.round_trips == 0
    assert any("no echo within 0.3s" in kind for kind in result.error_kinds)


async def test_errors_beyond_max_errors_end_the_run_early(unused_tcp_port: int) -> None:
    result = await bench(mode="pingpong", port=unused_tcp_port, duration=30, max_errors=2)
    assert result.duration_s < 5
    assert result.errors > 2
    assert not result.ok


async def test_oneshot_with_rate_paces_connections(echo_port: int) -> None:
    result = await bench(mode="oneshot", port=echo_port, size=64, rate=100.0, duration=0.5)
    assert_clean(result)
    assert 40 <= result.round_trips <= 55
    assert_latency_matches(result)


async def test_udp_without_a_server_reports_errors(unused_udp_port: int) -> None:
    result = await bench(mode="pingpong", udp=True, port=unused_udp_port, size=64, duration=5)
    assert not result.ok
    assert result.duration_s < 2  # ended early: more errors than --max-errors 0
    assert result.errors > 0


@pytest.mark.parametrize(
    ("mode", "unit"), [("pingpong", "round trips"), ("oneshot", "connections")]
)
async def test_a_run_that_falls_short_of_requests_fails(
    echo_port: int, mode: Mode, unit: str
) -> None:
    stop = asyncio.Event()

    def stop_once_something_was_echoed(progress: Progress) -> None:
        if progress.round_trips:
            stop.set()  # as Ctrl-C does

    requests = 10**9
    config = BenchConfig(mode=mode, connections=2, size=64, requests=requests, port=echo_port)
    result = await run_bench(config, progress=stop_once_something_was_echoed, stop=stop)
    assert 0 < result.round_trips < requests
    assert result.errors == result.mismatched_bytes == 0
    assert not result.ok
    assert result.problems() == [
        f"only {result.round_trips:,} of --requests 1,000,000,000 {unit} completed"
    ]
    document = result.to_json()
    assert (document["ok"], document["problems"]) == (False, result.problems())
    assert document["latency_ms"] is not None  # what did complete was measured


async def test_nothing_echoed_fails_with_one_reason_per_mode(unused_tcp_port: int) -> None:
    for mode, reason in (
        ("pingpong", "nothing was echoed: no round trip completed"),
        ("stream", "nothing was echoed: no byte came back"),
        ("oneshot", "nothing was echoed: no connection was opened and echoed"),
    ):
        result = await bench(
            mode=mode, port=unused_tcp_port, size=64, max_errors=1000, duration=0.3
        )
        assert result.errors > 0, mode
        assert result.problems() == [reason], mode
        assert result.to_json()["latency_ms"] is None


async def test_tls_against_a_plaintext_server_is_named(plaintext_port: int) -> None:
    result = await bench(mode="pingpong", tls=True, port=plaintext_port, connections=1)
    assert not result.ok
    assert len(result.error_kinds) == 1
    [kind] = result.error_kinds
    assert kind.startswith("connect: TLS: the server did not speak TLS ("), kind


async def test_a_host_that_does_not_resolve_is_named_in_the_errors() -> None:
    # run_bench checks the name first; this is a name that stops resolving during a run.
    config = BenchConfig(mode="pingpong", connections=1, size=64, duration=5,
                         host="no-such-host.invalid", port=7)  # fmt: skip
    summary = await Driver(config, lambda sample: None).run()
    [kind] = summary.error_kinds
    assert kind.startswith("connect: cannot resolve no-such-host.invalid: "), kind
