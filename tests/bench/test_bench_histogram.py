"""The HDR-style histogram: bucket layout, precision, percentiles, exact merging."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from echo_async.bench.histogram import BUCKET_COUNT, Histogram, bucket_bounds, bucket_index

values = st.integers(min_value=0, max_value=2**63 - 1)


def test_buckets_tile_the_integers_without_gaps() -> None:
    previous_high = -1
    for index in range(BUCKET_COUNT):
        low, high = bucket_bounds(index)
        assert low == previous_high + 1
        previous_high = high
    assert previous_high == 2**63 - 1


@given(values)
def test_a_value_lands_in_a_bucket_that_holds_it_within_one_percent(value: int) -> None:
    low, high = bucket_bounds(bucket_index(value))
    assert low <= value <= high
    assert high - low <= max(0, value) / 128


@given(values)
def test_record_agrees_with_bucket_index(value: int) -> None:
    histogram = Histogram()
    histogram.record(value)
    assert histogram.sparse() == {bucket_index(value): 1}


def test_percentiles_of_small_values_are_exact() -> None:
    histogram = Histogram.from_values(range(1, 101))
    assert histogram.percentile(50) == 50
    assert histogram.percentile(99) == 99
    assert histogram.percentile(99.9) == 100
    assert histogram.max == 100
    assert histogram.total == 100


def test_percentiles_of_large_values_are_within_bucket_precision() -> None:
    rng = random.Random(1)
    samples = sorted(rng.randrange(10_000, 50_000_000) for _ in range(10_000))
    histogram = Histogram.from_values(samples)
    for percent in (50, 90, 99, 99.9):
        exact = samples[int(len(samples) * percent / 100) - 1]
        assert abs(histogram.percentile(percent) - exact) <= exact / 64


def test_empty_histogram_reports_zero() -> None:
    assert Histogram().percentile(99) == 0
    assert Histogram().max == 0


@given(st.lists(values, max_size=50), st.lists(values, max_size=50))
def test_merge_is_exact(first: list[int], second: list[int]) -> None:
    merged = Histogram.from_values(first)
    merged.merge(Histogram.from_values(second))
    assert merged.counts == Histogram.from_values(first + second).counts
    sparse = Histogram.from_values(first)
    sparse.merge_sparse(Histogram.from_values(second).sparse())
    assert sparse.counts == merged.counts


def test_take_sparse_resets_in_place() -> None:
    histogram = Histogram.from_values([5, 5, 1_000_000])
    counts = histogram.counts
    assert histogram.take_sparse() == {5: 2, bucket_index(1_000_000): 1}
    assert histogram.counts is counts
    assert histogram.total == 0
