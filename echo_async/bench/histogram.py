"""An HDR-style latency histogram: log-linear buckets in one flat list of ints.

Values (nanoseconds) below 256 get a bucket each; above, every power of two is split into 128
buckets, so a bucket is never wider than 1/128 (0.8 %) of its values. Recording is one index
computation and one increment; merging two histograms is an elementwise add and loses nothing,
which is what lets ``--processes`` combine workers exactly.

Why this stays hand-written beside the ``hdrhistogram`` package, which the reported
percentiles and the ``--hdr-log`` file come from (:mod:`echo_async.bench.hdr`):

- Recording is on the bench's hot path, once per round trip. The clients inline this
  histogram's index computation into their own code (a list increment); the package's
  ``HdrHistogram.record_value`` is several Python method calls, 1 to 1.4 us a value against
  about 0.15 us for the inlined increment: 10 to 15 % more CPU per round trip for the bench
  (about 9 us in all, pingpong on 50 connections).
- Workers send the parent their tick's counts as ``{bucket index: count}`` and the parent adds
  them bucket by bucket (:meth:`merge_sparse`): exact, and cheap per tick. The package's
  exchange format is its compressed base64 payload, which would cost every worker an encode
  and the parent a decode per tick for the same result.

The layout is the package's own for 2 significant figures and a lowest value of 1: the same
buckets with the same indexes. So the counts go over once per interval (and once for the run)
with ``record_value(value, count)`` per non-empty bucket and nothing is rounded twice;
:meth:`percentile` uses HdrHistogram's rank rule, so the live view and the plot agree with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SUB_BUCKET_BITS = 8
HALF_BUCKETS = 1 << (SUB_BUCKET_BITS - 1)
BUCKET_COUNT = (63 - SUB_BUCKET_BITS + 2) * HALF_BUCKETS
"""Enough buckets for any value below 2**63, so recording never needs a bounds check."""


def bucket_index(value: int) -> int:
    """The bucket holding ``value`` (a non-negative int below 2**63)."""
    exponent = value.bit_length() - SUB_BUCKET_BITS
    if exponent > 0:
        return (exponent << (SUB_BUCKET_BITS - 1)) + (value >> exponent)
    return value


def bucket_bounds(index: int) -> tuple[int, int]:
    """The lowest and highest value that fall into bucket ``index``."""
    if index < 2 * HALF_BUCKETS:
        return index, index
    exponent = (index >> (SUB_BUCKET_BITS - 1)) - 1
    mantissa = index - (exponent << (SUB_BUCKET_BITS - 1))
    return mantissa << exponent, ((mantissa + 1) << exponent) - 1


class Histogram:
    """Counts of values per bucket; percentiles report a bucket's highest value, as HDR does."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: list[int] = [0] * BUCKET_COUNT

    def record(self, value: int, count: int = 1) -> None:
        """Add ``count`` occurrences of ``value``."""
        exponent = value.bit_length() - SUB_BUCKET_BITS
        if exponent > 0:
            self.counts[(exponent << (SUB_BUCKET_BITS - 1)) + (value >> exponent)] += count
        else:
            self.counts[value] += count

    @property
    def total(self) -> int:
        """How many values were recorded."""
        return sum(self.counts)

    def merge(self, other: Histogram) -> None:
        """Add every count of ``other`` into this histogram, in place."""
        counts = self.counts
        for index, count in enumerate(other.counts):
            if count:
                counts[index] += count

    def merge_sparse(self, sparse: Mapping[int, int]) -> None:
        """Add counts given as ``{bucket index: count}`` (the form workers send)."""
        counts = self.counts
        for index, count in sparse.items():
            counts[index] += count

    def sparse(self) -> dict[int, int]:
        """The non-zero buckets as ``{bucket index: count}``."""
        return {index: count for index, count in enumerate(self.counts) if count}

    def take_sparse(self) -> dict[int, int]:
        """Return :meth:`sparse` and reset those buckets to zero, in place.

        In place matters: the client protocols hold a reference to ``counts``.
        """
        taken = self.sparse()
        counts = self.counts
        for index in taken:
            counts[index] = 0
        return taken

    def percentile(self, percent: float) -> int:
        """The value at or below which ``percent`` % of the recorded values lie (0 when empty).

        The rank is HdrHistogram's (``percent`` % of the total, rounded half up, at least 1),
        so this agrees with ``HdrHistogram.get_value_at_percentile`` on the same counts.
        """
        total = self.total
        if total == 0:
            return 0
        rank = max(1, int(min(percent, 100.0) * total / 100 + 0.5))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return bucket_bounds(index)[1]
        raise AssertionError("unreachable: rank exceeds total")  # pragma: no cover

    @property
    def max(self) -> int:
        """The highest recorded value, to bucket precision (0 when empty)."""
        for index in range(BUCKET_COUNT - 1, -1, -1):
            if self.counts[index]:
                return bucket_bounds(index)[1]
        return 0

    @classmethod
    def from_values(cls, values: Iterable[int]) -> Histogram:
        """A histogram holding ``values``; for tests and small tools."""
        histogram = cls()
        for value in values:
            histogram.record(value)
        return histogram
