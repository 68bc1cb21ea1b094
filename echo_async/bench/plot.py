"""The --plot chart: throughput and latency percentiles over time, with matplotlib (optional)."""

from __future__ import annotations

from pathlib import Path

from echo_async.bench.result import BenchResult

INSTALL_HINT = "--plot needs matplotlib: pip install 'echo-async[plot]'"


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def check_available() -> None:
    """Raise PlotUnavailable, before any load is generated, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(INSTALL_HINT) from None


def write_plot(path: Path, result: BenchResult) -> None:
    """Draw throughput (top) and p50/p90/p99/p99.9 latency (bottom) per interval into a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, and no GUI toolkit imported
        from matplotlib import pyplot
    except ImportError as exc:  # pragma: no cover - check_available() ran first
        raise PlotUnavailable(INSTALL_HINT) from exc

    intervals = result.intervals
    times = [interval.end_s for interval in intervals]
    figure, (top, bottom) = pyplot.subplots(2, 1, sharex=True, figsize=(9, 6))
    try:
        if result.mode == "stream":
            top.plot(times, [i.echoed_bytes / i.seconds / 1e6 for i in intervals])
            top.set_ylabel("echoed MB/s")
        elif result.mode in ("oneshot", "hold"):
            top.plot(times, [i.connections_made / i.seconds for i in intervals])
            top.set_ylabel("connections/s")
        else:
            top.plot(times, [i.round_trips / i.seconds for i in intervals])
            top.set_ylabel("round trips/s")
        top.set_title(
            f"echo-async bench: {result.mode}, {result.connections} x {result.size} B, "
            f"{result.target}"
        )
        top.set_ylim(bottom=0)
        top.grid(True, alpha=0.3)
        for label, percent in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)):
            values = [i.latency.percentile(percent) / 1e6 for i in intervals]
            bottom.plot(times, values, label=label)
        bottom.set_ylabel("latency (ms)")
        bottom.set_xlabel("time (s)")
        if any(i.latency.total for i in intervals):
            bottom.set_yscale("log")
        bottom.legend(loc="upper left")
        bottom.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)
    finally:
        pyplot.close(figure)
