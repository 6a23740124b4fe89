"""The shared statistics: the Wilson interval behind every rate's "95% interval" and the
floor-adjusted removal behind every removal figure."""

from __future__ import annotations

import math

import pytest

from mergekit_backdoor.stats import floor_adjusted, wilson_interval


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634),
    (22, 24, 0.7415, 0.9768), (0, 0, 0.0, 1.0)])
def test_wilson_interval_matches_the_closed_form(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_narrows_with_more_rows_and_holds_the_rate():
    small, large = wilson_interval(8, 10), wilson_interval(800, 1000)
    assert small[0] < large[0] < 0.8 < large[1] < small[1]


@pytest.mark.parametrize(("victim", "after", "floor", "removal"), [
    (100.0, 10.0, 10.0, 1.0),   # down to the clean model's rate: all of it removed
    (80.0, 50.0, 20.0, 0.5),
    (80.0, 80.0, 20.0, 0.0),
    (80.0, 5.0, 20.0, 1.25),    # below the floor: more than the backdoor (a prior shift)
    (80.0, 90.0, 20.0, -1 / 6),  # a repair that makes it worse
])
def test_floor_adjusted_removal(victim, after, floor, removal):
    assert floor_adjusted(victim, after, floor) == pytest.approx(removal)


def test_floor_adjusted_removal_is_undefined_without_a_backdoor_above_the_floor():
    assert math.isnan(floor_adjusted(20.0, 10.0, 20.0))
    assert math.isnan(floor_adjusted(10.0, 5.0, 20.0))
