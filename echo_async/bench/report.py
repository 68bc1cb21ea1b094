"""Showing a bench run: live progress on a terminal, the summary table, the --json file."""

from __future__ import annotations

import json
from pathlib import Path
from time import monotonic
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from echo_async.bench.result import BenchResult, Progress

REFRESH_S = 0.25
NO_MEASUREMENT = "no measurement"


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _bytes_rate(value: float) -> str:
    return f"{value / 1e6:,.1f} MB/s"


def _count_and_rate(count: int, rate: float) -> str:
    """``count (rate/s)``; just the count when it is zero, whose rate measures nothing."""
    return f"{count:,} ({_rate(rate)}/s)" if count else "0"


def progress_table(progress: Progress) -> Table:
    """The live view: one row of where the run is now."""
    table = Table(title="echo-async bench (running)", title_justify="left")
    for heading in ("elapsed", "open", "round trips/s", "echoed", "p99 so far", "errors"):
        table.add_column(heading, justify="right")
    errors = str(progress.errors)
    if progress.mismatched_bytes:
        errors += f" + {progress.mismatched_bytes} bad bytes"
    table.add_row(
        f"{progress.elapsed_s:.1f}s",
        str(progress.connections_open),
        _rate(progress.round_trips_per_s),
        _bytes_rate(progress.echoed_bytes_per_s),
        f"{progress.p99_ms:.3f} ms",
        errors,
    )
    return table


class LiveProgress:
    """A rich Live display updated at most every REFRESH_S; use as a context manager.

    Draws nothing when ``enabled`` is false (``--quiet``, or output is not a terminal).
    """

    def __init__(self, console: Console, *, enabled: bool) -> None:
        self.live = Live(console=console, transient=True, auto_refresh=False) if enabled else None
        self.shown_at = 0.0

    def __enter__(self) -> LiveProgress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.live is not None:
            self.live.stop()

    def __call__(self, progress: Progress) -> None:
        now = monotonic()
        if self.live is None or now - self.shown_at < REFRESH_S:
            return
        self.shown_at = now
        self.live.update(progress_table(progress), refresh=True)


def summary_table(result: BenchResult) -> Table:
    """The final table: what was measured, the rates, the latency percentiles, the verdict."""
    table = Table(
        title=f"echo-async bench: {result.mode} against {result.target}", show_header=False
    )
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    rows = [
        ("connections", f"{result.connections} x {result.size} bytes"),
        ("duration", f"{result.duration_s:.2f} s"),
        ("round trips", _count_and_rate(result.round_trips, result.round_trips_per_s)),
        (
            "echoed",
            _bytes_rate(result.echoed_bytes_per_s) if result.echoed_bytes else NO_MEASUREMENT,
        ),
        ("connections opened", _count_and_rate(result.connections_made, result.connections_per_s)),
    ]
    if result.mode == "hold":
        rows.append(("held and echoed", f"{result.round_trips} of {result.connections}"))
    if result.latency.total:
        latency = result.latency_ms()
        for name, label in (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9")):
            rows.append((f"latency {label}", f"{latency[name]:.3f} ms"))
        rows.append(("latency max", f"{latency['max']:.3f} ms"))
    else:
        # Percentiles of an empty histogram are zeros: they would read like a fast server.
        rows.append(("latency", NO_MEASUREMENT))
    rows.append(("errors", f"{result.errors} (max {result.max_errors})"))
    for kind, count in sorted(result.error_kinds.items(), key=lambda item: -item[1]):
        rows.append(("", f"{kind}: {count}"))
    rows.append(("mismatched bytes", str(result.mismatched_bytes)))
    if result.first_mismatch:
        rows.append(("", f"first: {result.first_mismatch}"))
    if result.backends is not None:
        rows.extend(_backend_rows(result.backends))
    for label, value in rows:
        table.add_row(label, value)
    verdict = "[green]ok[/green]" if result.ok else "[red]FAILED[/red]"
    table.add_row("result", verdict)
    return table


def _backend_rows(backends: dict[str, int]) -> list[tuple[str, str]]:
    """--greeting: connections per greeting line, most first, with each one's share."""
    total = sum(backends.values())
    rows = [("backends", f"{len(backends)} ({total:,} connections)" if backends else "none")]
    for line, count in sorted(backends.items(), key=lambda item: (-item[1], item[0])):
        # A greeting is whatever the server sent: never let it be read as rich markup.
        name = escape(line) if line else "(empty line)"
        rows.append(("", f"{name}: {count:,} ({count / total:.1%})"))
    return rows


def write_json(path: Path, result: BenchResult) -> None:
    """Write the --json object to ``path``."""
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
