"""The log-scale buckets and the percentile estimate read back from them."""

from __future__ import annotations

import math
import random

import pytest

from relay.telemetry import series
from relay.telemetry.stats import highest, percentile

# The documented bound: the estimate is within a factor sqrt(GROWTH) of the true sample.
BOUND = math.sqrt(series.GROWTH)


def histogram(samples: list[float]) -> dict[int, float]:
    buckets: dict[int, float] = {}
    for value in samples:
        index = series.bucket_of(value)
        buckets[index] = buckets.get(index, 0.0) + 1
    return buckets


def nearest_rank(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@pytest.mark.parametrize("value", [0.001, 0.0012, 0.05, 0.3, 1.0, 7.5, 3600.0, 86400.0 * 3])
def test_a_value_falls_inside_its_bucket(value: float) -> None:
    low, high = series.bucket_bounds(series.bucket_of(value))
    assert low <= value < high
    assert 1 / BOUND <= series.bucket_value(series.bucket_of(value)) / value <= BOUND


def test_values_below_a_millisecond_share_bucket_zero_and_huge_ones_the_last() -> None:
    assert series.bucket_of(0.0) == series.bucket_of(0.0009) == series.bucket_of(-1.0) == 0
    assert series.bucket_of(1e12) == series.MAX_BUCKET


def test_percentiles_of_known_samples_are_within_the_documented_precision() -> None:
    rng = random.Random(7)
    # Latencies as providers show them: mostly 50-300 ms, a tail of slow seconds.
    samples = [rng.lognormvariate(math.log(0.12), 0.6) for _ in range(5000)]
    samples += [rng.uniform(2.0, 30.0) for _ in range(100)]
    buckets = histogram(samples)
    for q in (0.5, 0.9, 0.95, 0.99, 1.0):
        estimate = percentile(buckets, q)
        true = nearest_rank(samples, q)
        assert estimate is not None
        assert 1 / BOUND <= estimate / true <= BOUND, (q, estimate, true)
    assert highest(buckets) == percentile(buckets, 1.0)
    assert math.sqrt(series.GROWTH) - 1 < 0.091  # the docstring's "at most 9.1 %"


def test_small_histograms_use_the_nearest_rank() -> None:
    # 1 s, 2 s, 10 s: the median is the 2nd value, p95 and p99 the 3rd.
    buckets = histogram([1.0, 2.0, 10.0])
    assert percentile(buckets, 0.5) == pytest.approx(2.0, rel=BOUND - 1)
    assert percentile(buckets, 0.95) == pytest.approx(10.0, rel=BOUND - 1)
    assert percentile(buckets, 0.01) == pytest.approx(1.0, rel=BOUND - 1)


def test_no_samples_no_percentile() -> None:
    assert percentile({}, 0.5) is None
    assert highest({}) is None
    assert percentile({3: 0.0}, 0.5) is None


def test_histograms_from_two_writers_add_up_to_the_histogram_of_all_samples() -> None:
    a, b = [0.01 * i for i in range(1, 200)], [0.5 * i for i in range(1, 50)]
    merged = histogram(a)
    for index, n in histogram(b).items():
        merged[index] = merged.get(index, 0.0) + n
    assert merged == histogram(a + b)
    assert percentile(merged, 0.9) == percentile(histogram(a + b), 0.9)
