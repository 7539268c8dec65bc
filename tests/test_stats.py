"""resrl_analysis.stats against scipy.stats (an independent reference) and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as ss

from resrl_analysis.stats import (
    describe_difference,
    describe_interval,
    mean_interval,
    t_cdf,
    t_ppf,
    welch_difference,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("df", [1, 2, 3, 4.5, 7, 30, 200])
@pytest.mark.parametrize("q", [0.025, 0.5, 0.9, 0.975, 0.995])
def test_t_quantile_and_cdf_match_scipy(df, q):
    assert t_ppf(q, df) == pytest.approx(ss.t.ppf(q, df), rel=1e-9, abs=1e-9)
    x = ss.t.ppf(q, df)
    assert t_cdf(x, df) == pytest.approx(q, abs=1e-10)


def test_mean_t_interval_matches_scipy_and_hand_case():
    x = [0.3, -0.1, 0.5, 0.2]
    iv = mean_interval(x)
    lo, hi = ss.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=ss.sem(x))
    assert (iv.mean, iv.lo, iv.hi) == pytest.approx((np.mean(x), lo, hi), rel=1e-9)
    assert iv.seeds == tuple(x) and iv.n == 4 and iv.df == 3
    # Hand: values 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302653, half-width 4.302653/sqrt(3) = 2.484138.
    iv = mean_interval([1, 2, 3])
    assert (iv.lo, iv.hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    # None and NaN are dropped; one value has no interval.
    iv = mean_interval([1.0, None, float("nan")])
    assert iv.n == 1 and math.isnan(iv.lo) and not iv.excludes_zero
    with pytest.raises(ValueError, match="no finite value"):
        mean_interval([None])


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    x = [0.1, 0.4, 0.35, 0.8, 0.2]
    a, b = mean_interval(x, method="bootstrap", seed=1), mean_interval(x, method="bootstrap", seed=1)
    assert a == b and a.lo < a.mean < a.hi
    assert min(x) <= a.lo and a.hi <= max(x)  # resampled means cannot leave the data's range
    # Against numpy's percentile of the same resampled means is not possible (other RNG), so against scipy's
    # bootstrap loosely: both estimate the same percentile interval.
    ref = ss.bootstrap((np.array(x),), np.mean, method="percentile", n_resamples=20000, random_state=0)
    assert a.lo == pytest.approx(ref.confidence_interval.low, abs=0.03)
    assert a.hi == pytest.approx(ref.confidence_interval.high, abs=0.03)
    with pytest.raises(ValueError, match="method"):
        mean_interval(x, method="jackknife")


def test_welch_difference_matches_scipy_ttest_ind():
    a, b = [0.12, -0.3, 0.05, 0.4], [0.9, 0.2, 0.6]
    d = welch_difference(a, b)
    ref = ss.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert d.mean == pytest.approx(np.mean(a) - np.mean(b))
    assert (d.lo, d.hi) == pytest.approx((ci.low, ci.high), rel=1e-8)
    assert d.df == pytest.approx(ref.df, rel=1e-10)
    # Hand: equal sizes and variances → df = 2(n−1): a = 1,2,3; b = 2,3,4: diff −1, se = sqrt(2/3), df 4.
    d = welch_difference([1, 2, 3], [2, 3, 4])
    half = 2.7764451 * math.sqrt(2 / 3)
    assert d.df == pytest.approx(4.0) and (d.lo, d.hi) == pytest.approx((-1 - half, -1 + half), abs=1e-6)
    # No spread at all, or one value: no interval.
    assert math.isnan(welch_difference([1, 1], [0, 0]).lo) and math.isnan(welch_difference([1, 2], [0]).hi)


def test_sentences_follow_the_numbers():
    inc = welch_difference([-0.3, 0.1, -0.2], [-0.1, 0.0, -0.05])
    s = describe_difference("ResRL − NSR in-batch LLD Δ", inc)
    assert s.startswith("ResRL − NSR in-batch LLD Δ: −0.083 [") and "includes 0, no difference shown at 3 seeds" in s
    exc = welch_difference([-1.0, -1.1, -0.9], [0.1, 0.0, 0.2])
    assert exc.excludes_zero and "excludes 0 (the second is higher) at 3 seeds" in describe_difference("d", exc)
    assert "excludes 0 (PSR is higher)" in describe_difference("d", exc, names=("NSR", "PSR"))
    one = welch_difference([1.0], [0.0])
    assert "no interval at 1 seed" in describe_difference("d", one)
    assert describe_interval(mean_interval([0.5])) == "0.500 (1 seed, no interval)"
    assert mean_interval([1.0, 2.0]).to_dict()["seeds"] == [1.0, 2.0]
    assert mean_interval([1.0]).to_dict()["lo"] is None


def test_narrow_intervals_get_the_decimals_that_show_them():
    iv = welch_difference([0.0950, 0.0951, 0.0952], [0.0953, 0.0954, 0.0955])
    s = describe_difference("d", iv)
    assert iv.excludes_zero and "0.000 [0.000" not in s and "excludes 0" in s
    lo, hi = s.split("[")[1].split("]")[0].split(", ")
    assert float(lo.replace("−", "-")) < 0 and float(hi.replace("−", "-")) < 0  # the printed ends exclude 0 too


def test_zero_spread_on_both_sides_is_said_plainly():
    same = describe_difference("pass@64", welch_difference([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]))
    assert "every seed of both gave the same value" in same and "no difference" in same
    shifted = describe_difference("d", welch_difference([2.0, 2.0], [1.0, 1.0]))
    assert shifted.startswith("d: 1.000:") and "the same difference in every seed" in shifted


def test_an_end_near_zero_of_an_excluding_interval_is_not_printed_as_zero():
    from resrl_analysis.stats import Interval

    s = describe_difference("d", Interval(-0.019, -0.039, -0.0003, method="welch", n=3))
    assert "excludes 0" in s
    hi = s.split("[")[1].split("]")[0].split(", ")[1]
    assert hi.startswith("−") and float(hi.replace("−", "-")) < 0
