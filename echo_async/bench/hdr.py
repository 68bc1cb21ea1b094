"""HdrHistogram: the bench's latencies as ``hdrhistogram`` histograms and an interval log.

The bench records into its own :class:`~echo_async.bench.histogram.Histogram` (its docstring
says why). This module hands those counts to the field's implementation, the ``hdrhistogram``
package (``hdrh``): the reported percentiles come from its ``HdrHistogram``, and its
``HistogramLogWriter`` writes the ``--hdr-log`` interval log that HdrHistogram's own log
readers, ``HistogramLogProcessor`` and HistogramLogAnalyzer read.

Values are nanoseconds: the bench's clock, jHiccup's logs, and what HistogramLogProcessor
assumes unless told otherwise (it divides by 1e6 to print milliseconds). With 2 significant
figures and a lowest value of 1 ns an HdrHistogram has exactly the bench histogram's buckets,
so the hand-over is exact: the same counts, the same percentiles.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogWriter

from echo_async import __version__
from echo_async.bench.driver import TICK_S
from echo_async.bench.histogram import Histogram, bucket_bounds

if TYPE_CHECKING:
    from echo_async.bench.result import BenchResult

SIGNIFICANT_FIGURES = 2
"""2 gives the bench histogram's own buckets (1/128 to 1/256 of a value); 3 would claim a
precision the recorded counts do not have."""
LOWEST_TRACKABLE_NS = 1
NS_PER_MS = 1_000_000
"""The log's Interval_Max column is in milliseconds, as HdrHistogram's tools write it."""


def highest_trackable_ns(timeout_s: float) -> int:
    """The top of the HdrHistogram range for a run with ``--timeout timeout_s``.

    An echo is given up at the first tick after it is overdue, so a recorded latency is at most
    the timeout, plus a tick, plus however late the event loop ran: the range is twice the
    first two. The margin is cheap (128 counters per doubling); a value still beyond it is
    clamped and counted by :func:`to_hdr`.
    """
    return max(2 * LOWEST_TRACKABLE_NS, round(2 * (timeout_s + TICK_S) * 1e9))


def to_hdr(histogram: Histogram, highest_ns: int) -> tuple[HdrHistogram, int]:
    """An HdrHistogram holding ``histogram``'s counts, and how many of them were above its range.

    One ``record_value(value, count)`` per non-empty bucket, with the bucket's lowest value,
    which lands in the HdrHistogram bucket of the same bounds. ``record_value`` drops a value
    above ``highest_ns``; those are recorded as ``highest_ns`` instead, so the total still
    counts every round trip, and counted in the second item.
    """
    hdr = HdrHistogram(LOWEST_TRACKABLE_NS, highest_ns, SIGNIFICANT_FIGURES)
    clamped = 0
    for index, count in histogram.sparse().items():
        value = bucket_bounds(index)[0]
        if value > highest_ns:
            value = highest_ns
            clamped += count
        hdr.record_value(value, count)
    return hdr, clamped


def start_time_line(epoch_s: float) -> str:
    """The log's ``#[StartTime: ...]`` line for a run that began at ``epoch_s``.

    hdrhistogram 0.10.8's ``HistogramLogWriter.output_start_time`` raises: it calls
    ``datetime.iso_format``, which no Python has, on a time in milliseconds. This is the line it
    means to write, in the form its ``HistogramLogReader`` and Java's parse (seconds, a space).
    """
    when = datetime.fromtimestamp(epoch_s).astimezone().isoformat(" ", "milliseconds")
    return f"#[StartTime: {epoch_s:.3f} (seconds since epoch), {when}]\n"


def write_log(path: Path, result: BenchResult) -> None:
    """Write ``result`` to ``path`` as an HdrHistogram interval log (``--hdr-log``).

    One line per interval of the run, all processes merged, empty intervals too; timestamps
    are seconds from the run's start, which the header gives as StartTime and BaseTime.
    Raises OSError when ``path`` cannot be written.
    """
    highest_ns = int(result.latency_hdr.highest_trackable_value)
    started_s = round(result.started_at, 3)  # StartTime and BaseTime must be the same instant
    with path.open("w", encoding="utf-8") as file:
        writer = HistogramLogWriter(file)
        writer.output_comment(f"[Logged with echo-async bench {__version__}]")
        writer.output_comment(
            f"[{result.mode}: {result.connections} connections x {result.size} bytes, "
            f"{result.target}]"
        )
        writer.output_comment(
            f"[Values: latency in nanoseconds, up to {highest_ns}; Interval_Max: milliseconds]"
        )
        if result.latency_clamped:
            writer.output_comment(
                f"[{result.latency_clamped} latencies above {highest_ns} ns are recorded as "
                f"{highest_ns} ns]"
            )
        writer.output_log_format_version()
        file.write(start_time_line(started_s))
        writer.output_base_time(started_s * 1000)
        writer.output_legend()
        for interval in result.intervals:
            hdr, _ = to_hdr(interval.latency, highest_ns)
            # The writer falls back to the histogram's own time stamps (milliseconds, from
            # the base time) when a given one is 0, as the first interval's start is.
            hdr.set_start_time_stamp(interval.start_s * 1000)
            hdr.set_end_time_stamp(interval.end_s * 1000)
            # hdrhistogram 0.10.8 floors Interval_Max to whole milliseconds (Java's writer
            # keeps three decimals); readers take the maximum from the histogram itself.
            writer.output_interval_histogram(hdr, interval.start_s, interval.end_s, NS_PER_MS)
