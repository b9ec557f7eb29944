import math

from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.metrics.sparkline import BARS, NOT_FINITE, downsample, sparkline


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300), st.integers(1, 60))
def test_width_and_extremes(values, width):
    line = sparkline(values, width)
    assert len(line) == min(width, len(values))
    assert set(line) <= set(BARS)
    if len(set(downsample(values, width))) > 1:
        assert BARS[0] in line and BARS[-1] in line


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300), st.integers(1, 60))
def test_sorted_input_gives_non_decreasing_bars(values, width):
    line = sparkline(sorted(values), width)
    assert [BARS.index(c) for c in line] == sorted(BARS.index(c) for c in line)


def test_non_finite_buckets_are_marked():
    assert sparkline([1.0, 2.0, math.nan, 3.0], 4) == BARS[0] + BARS[4] + NOT_FINITE + BARS[-1]
    assert sparkline([math.inf] * 3) == NOT_FINITE * 3
    assert sparkline([2.0, 2.0]) == BARS[4] * 2
    assert sparkline([]) == ""
    assert sparkline([1.0] * 80 + [math.nan], 40)[-1] == NOT_FINITE


def test_downsample_bucket_means():
    assert downsample([1.0, 3.0, 5.0, 7.0], 2) == [2.0, 6.0]
    assert downsample([1e308, 1e308], 1) == [1e308]
