"""Bootstrap intervals: deterministic for a seed, the right width, degenerate cases handled."""
import math

from medtune.eval.stats import bootstrap_ci, estimate


def test_same_seed_same_interval_and_other_seed_differs():
    values = [1.0] * 37 + [0.0] * 63
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(list(values), seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_interval_width_matches_the_normal_approximation():
    # p = 0.5, n = 400: standard error 2.5 points, so the 95% half-width is about 1.96 * 2.5 = 4.9.
    result = estimate([1.0, 0.0] * 200, resamples=2000, seed=0)
    assert result.value == 50.0 and result.n == 400
    assert 4.0 < (result.high - result.low) / 2 < 5.8
    assert result.low < result.value < result.high


def test_more_items_give_a_narrower_interval():
    small = estimate([1.0, 0.0, 0.0, 1.0, 1.0] * 10)
    large = estimate([1.0, 0.0, 0.0, 1.0, 1.0] * 160)
    assert small.value == large.value == 60.0
    assert (large.high - large.low) < (small.high - small.low) / 2


def test_degenerate_inputs():
    assert estimate([1.0, 1.0, 1.0]).to_dict() == {"value": 100.0, "n": 3, "ci_low": 100.0, "ci_high": 100.0}
    assert estimate([0.25]).to_dict() == {"value": 25.0, "n": 1, "ci_low": 25.0, "ci_high": 25.0}
    empty = estimate([])
    assert empty.n == 0 and math.isnan(empty.value)


def test_overlap():
    a, b = estimate([1.0] * 50 + [0.0] * 50), estimate([1.0] * 90 + [0.0] * 10)
    assert not a.overlaps(b) and a.overlaps(a)
