"""BenchResult: the outcome of a load test, and Aggregate, which builds it from samples."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from echo_async.bench import hdr
from echo_async.bench.config import BenchConfig, Mode
from echo_async.bench.driver import TICK_S, Sample, ShareSummary
from echo_async.bench.histogram import Histogram

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))

# What a run that echoed nothing failed to do, per mode (hold says it with its own count).
NOTHING_ECHOED = {
    "pingpong": "no round trip completed",
    "stream": "no byte came back",
    "oneshot": "no connection was opened and echoed",
}


@dataclass(slots=True)
class Interval:
    """One tick of the whole run (all processes): counts and the latencies completed in it."""

    start_s: float
    end_s: float
    round_trips: int = 0
    echoed_bytes: int = 0
    connections_made: int = 0
    connections_open: int = 0
    errors: int = 0
    latency: Histogram = field(default_factory=Histogram)

    @property
    def seconds(self) -> float:
        return max(self.end_s - self.start_s, 1e-9)


@dataclass(slots=True)
class BenchResult:
    """Totals, rates, the latency histogram and the timeline of one load test.

    ``latency`` holds the whole run's counts as recorded, ``latency_hdr`` the same counts in
    the ``hdrhistogram`` package's HdrHistogram, which :meth:`latency_ms` reports from;
    ``latency_clamped`` of them were above its range (see :func:`hdr.to_hdr`).
    ``started_at``: when the load began, in seconds since the epoch.
    """

    mode: Mode
    connections: int
    size: int
    target: str
    max_errors: int
    duration_s: float
    round_trips: int
    echoed_bytes: int
    connections_made: int
    errors: int
    mismatched_bytes: int
    latency: Histogram
    latency_hdr: HdrHistogram
    latency_clamped: int
    intervals: list[Interval]
    error_kinds: dict[str, int]
    first_mismatch: str | None
    started_at: float
    backends: dict[str, int] | None = None
    """Connections per greeting line, most first (``--greeting`` only; else None)."""
    requests: int | None = None
    """``--requests``: round trips (oneshot: connections) the run was asked for; else None."""

    @property
    def round_trips_per_s(self) -> float:
        return self.round_trips / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def echoed_bytes_per_s(self) -> float:
        return self.echoed_bytes / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def connections_per_s(self) -> float:
        return self.connections_made / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def echoed_anything(self) -> bool:
        """Whether the run measured something: an echo completed (stream: a byte came back)."""
        return (self.echoed_bytes if self.mode == "stream" else self.round_trips) > 0

    def latency_ms(self) -> dict[str, float]:
        """p50, p90, p99, p999 and max of the round-trip latency, in milliseconds.

        All zero when no round trip completed: check ``latency.total`` before reading them.
        They come from ``latency_hdr``, so they are what HdrHistogram's tools read in the
        ``--hdr-log`` file.
        """
        source = self.latency_hdr
        values = {
            name: int(source.get_value_at_percentile(percent)) for name, percent in PERCENTILES
        }
        values["max"] = int(source.get_max_value())
        return {name: round(value / 1e6, 6) for name, value in values.items()}

    def problems(self) -> list[str]:
        """Why this run failed, one sentence each; empty when it passed."""
        found = []
        if self.mismatched_bytes:
            found.append(
                f"{self.mismatched_bytes} echoed bytes differ from what was sent"
                + (f" (first: {self.first_mismatch})" if self.first_mismatch else "")
            )
        if self.errors > self.max_errors:
            kinds = ", ".join(f"{kind} x{count}" for kind, count in self.error_kinds.items())
            found.append(f"{self.errors} errors, more than --max-errors {self.max_errors}: {kinds}")
        if self.backends == {}:
            # Without this a server that sends no greeting passes any run no longer than
            # --timeout: every connection is still waiting for its line when the run ends.
            found.append("--greeting: no connection received a greeting line")
        if self.mode != "hold" and not self.echoed_anything:
            # However many errors --max-errors tolerates, a run with no echo measured nothing:
            # without this a CI gate passes while the server is down.
            found.append(f"nothing was echoed: {NOTHING_ECHOED[self.mode]}")
        elif self.requests is not None and self.round_trips < self.requests:
            unit = "connections" if self.mode == "oneshot" else "round trips"
            found.append(
                f"only {self.round_trips:,} of --requests {self.requests:,} {unit} completed"
            )
        if self.mode == "hold" and self.round_trips < self.connections:
            found.append(
                f"hold: only {self.round_trips} of {self.connections} connections "
                "were opened and echoed"
            )
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object: exactly the documented keys; ``backends`` only with --greeting.

        A rate or latency with nothing behind it (no round trip, no byte, no connection) is
        null, not a zero that reads like a measurement; ``ok`` and ``problems`` give the verdict.
        """
        document: dict[str, Any] = {
            "mode": self.mode,
            "connections": self.connections,
            "size": self.size,
            "duration_s": round(self.duration_s, 6),
            "round_trips": self.round_trips,
            "round_trips_per_s": _measured(self.round_trips, self.round_trips_per_s),
            "echoed_bytes_per_s": _measured(self.echoed_bytes, self.echoed_bytes_per_s),
            "connections_per_s": _measured(self.connections_made, self.connections_per_s),
            "latency_ms": self.latency_ms() if self.latency.total else None,
            "errors": self.errors,
            "mismatched_bytes": self.mismatched_bytes,
            "target": self.target,
            "ok": self.ok,
            "problems": self.problems(),
        }
        if self.backends is not None:
            document["backends"] = self.backends
        return document


def _measured(count: int, rate: float) -> float | None:
    """``rate`` rounded for JSON, or None when it counts nothing."""
    return round(rate, 3) if count else None


@dataclass(slots=True)
class Progress:
    """What the live display shows, for the whole run so far."""

    elapsed_s: float
    connections_open: int
    round_trips_per_s: float
    echoed_bytes_per_s: float
    p99_ms: float
    round_trips: int
    errors: int
    mismatched_bytes: int


class Aggregate:
    """Sums samples from any number of processes into totals, a histogram and a timeline.

    Histograms merge by adding bucket counts, so combining processes loses nothing.
    """

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.started_at = time.time()  # until the first sample says when the load began
        self.latency = Histogram()
        self.intervals: dict[int, Interval] = {}
        self.open_by_process: dict[int, int] = {}
        self.round_trips = 0
        self.echoed_bytes = 0
        self.connections_made = 0
        self.errors = 0
        self.mismatched_bytes = 0
        self.elapsed_s = 0.0

    def add(self, process: int, sample: Sample) -> None:
        """Fold in one sample of process number ``process``."""
        if not self.intervals:
            self.started_at = time.time() - sample.elapsed_s
        interval = self.intervals.get(sample.tick)
        if interval is None:
            interval = self.intervals[sample.tick] = Interval(
                sample.tick * TICK_S, sample.elapsed_s
            )
        interval.end_s = max(interval.end_s, sample.elapsed_s)
        interval.round_trips += sample.round_trips
        interval.echoed_bytes += sample.echoed_bytes
        interval.connections_made += sample.connections_made
        interval.errors += sample.errors
        interval.latency.merge_sparse(sample.latency)
        self.open_by_process[process] = sample.connections_open
        interval.connections_open = sum(self.open_by_process.values())
        self.latency.merge_sparse(sample.latency)
        self.round_trips += sample.round_trips
        self.echoed_bytes += sample.echoed_bytes
        self.connections_made += sample.connections_made
        self.errors += sample.errors
        self.mismatched_bytes += sample.mismatched_bytes
        self.elapsed_s = max(self.elapsed_s, sample.elapsed_s)

    def progress(self) -> Progress:
        """The state of the run so far, for the live display."""
        latest = self.intervals[max(self.intervals)] if self.intervals else None
        return Progress(
            elapsed_s=self.elapsed_s,
            connections_open=sum(self.open_by_process.values()),
            round_trips_per_s=latest.round_trips / latest.seconds if latest else 0.0,
            echoed_bytes_per_s=latest.echoed_bytes / latest.seconds if latest else 0.0,
            p99_ms=self.latency.percentile(99.0) / 1e6,
            round_trips=self.round_trips,
            errors=self.errors,
            mismatched_bytes=self.mismatched_bytes,
        )

    def result(self, summaries: list[ShareSummary]) -> BenchResult:
        """The final result, given every process's summary."""
        error_kinds: dict[str, int] = {}
        for summary in summaries:
            for kind, count in summary.error_kinds.items():
                error_kinds[kind] = error_kinds.get(kind, 0) + count
        mismatches = [summary.first_mismatch for summary in summaries if summary.first_mismatch]
        backends = merge_backends([summary.backends for summary in summaries])
        config = self.config
        latency_hdr, clamped = hdr.to_hdr(self.latency, hdr.highest_trackable_ns(config.timeout))
        return BenchResult(
            mode=config.mode,
            connections=config.connections,
            size=config.size,
            target=config.target,
            max_errors=config.max_errors,
            duration_s=max([summary.elapsed_s for summary in summaries], default=self.elapsed_s),
            round_trips=self.round_trips,
            echoed_bytes=self.echoed_bytes,
            connections_made=self.connections_made,
            errors=self.errors,
            mismatched_bytes=self.mismatched_bytes,
            latency=self.latency,
            latency_hdr=latency_hdr,
            latency_clamped=clamped,
            intervals=[self.intervals[tick] for tick in sorted(self.intervals)],
            error_kinds=error_kinds,
            first_mismatch=mismatches[0] if mismatches else None,
            started_at=self.started_at,
            backends=backends if config.greeting else None,
            requests=config.requests,
        )


def merge_backends(counts: list[dict[str, int]]) -> dict[str, int]:
    """Add per-process connection counts per greeting line; most connections first, then by
    line, so equal inputs give identical output whatever the process order.
    """
    total: dict[str, int] = {}
    for process in counts:
        for line, count in process.items():
            total[line] = total.get(line, 0) + count
    return dict(sorted(total.items(), key=lambda item: (-item[1], item[0])))
