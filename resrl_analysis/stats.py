"""Intervals across seeds, and sentences written from them (no torch, no scipy).

A headline number of the demo is the mean of one metric over independent runs (seeds) with a 95%
interval: Student's t by default, a percentile bootstrap on request. Two algorithms are compared by
the difference of their means with Welch's interval (unequal variances, Welch–Satterthwaite degrees
of freedom). :func:`describe_difference` turns such an interval into a sentence, so that what a
summary says follows from the numbers and from nothing written in advance.

The t quantile is computed here (bisection on the CDF, through the regularized incomplete beta
function) so that the tests can check it against ``scipy.stats`` as an independent reference.

    >>> iv = mean_interval([1.0, 2.0, 3.0])
    >>> round(iv.mean, 3), round(iv.lo, 3), round(iv.hi, 3)
    (2.0, -0.484, 4.484)
    >>> d = welch_difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    >>> describe_difference("ResRL − NSR in-batch LLD Δ", d)
    'ResRL − NSR in-batch LLD Δ: −1.000 [−3.267, 1.267]: the interval includes 0, no difference shown at 3 seeds'
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Interval", "t_cdf", "t_ppf", "mean_interval", "welch_difference", "describe_interval", "interval_digits",
           "describe_difference", "fmt_number", "ols_slope"]


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval.

    Attributes:
        mean: the point estimate (a mean, or a difference of two means).
        lo, hi: the interval's ends (NaN when it cannot be computed: fewer than 2 values).
        level: the confidence level (0.95).
        method: ``"t"``, ``"bootstrap"`` or ``"welch"``.
        n: number of values (for a difference: of the smaller sample).
        df: degrees of freedom of the t quantile used (NaN for the bootstrap).
        seeds: the values the estimate came from (for a difference: empty).
    """

    mean: float
    lo: float
    hi: float
    level: float = 0.95
    method: str = "t"
    n: int = 0
    df: float = math.nan
    seeds: tuple[float, ...] = field(default_factory=tuple)

    @property
    def excludes_zero(self) -> bool:
        """True iff the interval is finite and lies wholly on one side of 0."""
        return math.isfinite(self.lo) and math.isfinite(self.hi) and (self.lo > 0 or self.hi < 0)

    @classmethod
    def from_dict(cls, d: dict, *, n: int | None = None) -> Interval:
        """The inverse of :meth:`to_dict` (None ends as NaN); ``n`` defaults to the number of ``seeds``.

        >>> Interval.from_dict({"mean": 1.0, "lo": None, "hi": 2.0, "seeds": [1.0, 1.0]}).n
        2
        """
        def f(x: float | None) -> float:
            return math.nan if x is None else float(x)

        return cls(f(d["mean"]), f(d.get("lo")), f(d.get("hi")), d.get("level", 0.95), d.get("method", "t"),
                   len(d.get("seeds", ())) if n is None else n)

    def to_dict(self) -> dict:
        """``{"mean", "lo", "hi", "seeds"}`` (NaN as None, JSON-ready) plus the method, level and n."""
        def j(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {"mean": j(self.mean), "lo": j(self.lo), "hi": j(self.hi), "seeds": [j(s) for s in self.seeds],
                "level": self.level, "method": self.method, "n": self.n}


# ----------------------------------------------------------------------------- Student's t


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function (modified Lentz), Numerical Recipes §6.4.
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T ≤ x) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom.

    >>> t_cdf(0.0, 3), round(t_cdf(2.0, 1), 6)
    (0.5, 0.852416)
    """
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`).

    >>> round(t_ppf(0.975, 2), 4), round(t_ppf(0.975, 1e6), 3)
    (4.3027, 1.96)
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- intervals


def _clean(values: Sequence[float | None], what: str) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if math.isfinite(f):
            out.append(f)
    if not out:
        raise ValueError(f"{what}: no finite value")
    return out


def _var(x: list[float]) -> float:
    m = sum(x) / len(x)
    return sum((v - m) ** 2 for v in x) / (len(x) - 1)


def mean_interval(values: Sequence[float | None], *, level: float = 0.95, method: str = "t", n_boot: int = 10_000,
                  seed: int = 0) -> Interval:
    """Mean of ``values`` (None and NaN dropped) with a two-sided ``level`` interval.

    ``method="t"``: mean ± t_{(1+level)/2, n−1} · s/√n. ``method="bootstrap"``: the percentile interval of
    ``n_boot`` resampled means (seeded). With one value the ends are NaN (no interval from one seed).

    >>> iv = mean_interval([0.5])
    >>> iv.mean, math.isnan(iv.lo), iv.seeds
    (0.5, True, (0.5,))
    """
    if method not in ("t", "bootstrap"):
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = _clean(values, "mean_interval")
    n, m = len(x), sum(x) / len(x)
    if n < 2:
        return Interval(m, math.nan, math.nan, level, method, n, math.nan, tuple(x))
    if method == "t":
        half = t_ppf(0.5 + level / 2.0, n - 1) * math.sqrt(_var(x) / n)
        return Interval(m, m - half, m + half, level, "t", n, float(n - 1), tuple(x))
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(x) for _ in range(n)) / n for _ in range(n_boot))
    a = (1.0 - level) / 2.0

    def pct(p: float) -> float:  # linear interpolation between order statistics (numpy's default)
        pos = p * (len(means) - 1)
        i = int(math.floor(pos))
        j = min(i + 1, len(means) - 1)
        return means[i] + (means[j] - means[i]) * (pos - i)

    return Interval(m, pct(a), pct(1.0 - a), level, "bootstrap", n, math.nan, tuple(x))


def welch_difference(a: Sequence[float | None], b: Sequence[float | None], *, level: float = 0.95) -> Interval:
    """mean(a) − mean(b) with Welch's ``level`` interval (unequal variances).

    df = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1)); NaN ends when either sample has
    fewer than 2 values or both have zero spread.

    >>> d = welch_difference([1.0, 1.0], [0.0])
    >>> d.mean, math.isnan(d.hi)
    (1.0, True)
    """
    xa, xb = _clean(a, "welch_difference: first sample"), _clean(b, "welch_difference: second sample")
    na, nb = len(xa), len(xb)
    diff = sum(xa) / na - sum(xb) / nb
    if na < 2 or nb < 2:
        return Interval(diff, math.nan, math.nan, level, "welch", min(na, nb))
    va, vb = _var(xa) / na, _var(xb) / nb
    se2 = va + vb
    if se2 == 0.0:
        return Interval(diff, math.nan, math.nan, level, "welch", min(na, nb))
    df = se2**2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = t_ppf(0.5 + level / 2.0, df) * math.sqrt(se2)
    return Interval(diff, diff - half, diff + half, level, "welch", min(na, nb), df)


def ols_slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares line y = a + b·x: returns (b, a); NaN slope for fewer than 2 distinct x.

    >>> ols_slope([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    (2.0, 1.0)
    """
    n = len(x)
    if n != len(y):
        raise ValueError(f"ols_slope: x has {n} values, y {len(y)}")
    if n < 2:
        return math.nan, math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0.0:
        return math.nan, math.nan
    b = sum((a - mx) * (c - my) for a, c in zip(x, y)) / sxx
    return b, my - b * mx


# ----------------------------------------------------------------------------- sentences


def fmt_number(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals and a true minus sign; ``–`` for NaN.

    >>> fmt_number(-0.1234), fmt_number(float("nan"))
    ('−0.123', '–')
    """
    if not math.isfinite(x):
        return "–"
    s = f"{x:.{digits}f}"
    if s.startswith("-") and float(s) == 0.0:
        s = s[1:]
    return s.replace("-", "−")


def interval_digits(iv: Interval, digits: int = 3, *, max_digits: int = 6) -> int:
    """Decimals that show an interval's width to 2 significant figures (at least ``digits``).

    A narrow interval printed with too few decimals reads as ``0.000 [0.000, 0.000]``, which hides
    whether it excludes 0.

    >>> interval_digits(Interval(0.0003, 0.0001, 0.0005)), interval_digits(Interval(0.2, 0.1, 0.3))
    (5, 3)
    >>> interval_digits(Interval(-0.019, -0.039, -0.0003))  # the end near 0 keeps its sign visible
    4
    """
    width = iv.hi - iv.lo
    if not (math.isfinite(width) and width > 0):
        return digits
    d = int(min(max_digits, max(digits, math.ceil(-math.log10(width)) + 1)))
    # An interval that excludes 0 must not print an end as 0.000 ("[−0.039, 0.000] excludes 0" reads wrong).
    near = min(abs(iv.lo), abs(iv.hi))
    while iv.excludes_zero and d < max_digits and round(near, d) == 0.0:
        d += 1
    return d


def describe_interval(iv: Interval, digits: int = 3) -> str:
    """``"mean [lo, hi]"``, or ``"mean (1 seed, no interval)"``; more decimals when the interval is narrow.

    >>> describe_interval(mean_interval([1.0, 2.0, 3.0]), 2)
    '2.00 [−0.48, 4.48]'
    >>> describe_interval(Interval(-0.0003, -0.0004, -0.0002))
    '−0.00030 [−0.00040, −0.00020]'
    """
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return f"{fmt_number(iv.mean, digits)} ({iv.n} seed{'s' if iv.n != 1 else ''}, no interval)"
    d = interval_digits(iv, digits)
    return f"{fmt_number(iv.mean, d)} [{fmt_number(iv.lo, d)}, {fmt_number(iv.hi, d)}]"


def describe_difference(label: str, iv: Interval, digits: int = 3, *,
                        names: tuple[str, str] = ("the first", "the second")) -> str:
    """One sentence on a difference a − b, from its numbers: whether its interval excludes 0, and which of
    ``names`` (a's, b's) is then higher.

    >>> describe_difference("A − B", welch_difference([3.0, 3.1, 2.9], [1.0, 1.1, 0.9]))
    'A − B: 2.000 [1.773, 2.227]: the interval excludes 0 (the first is higher) at 3 seeds'
    >>> describe_difference("A − B", welch_difference([1.0, 1.1, 0.9], [3.0, 3.1, 2.9]), names=("A", "B"))
    'A − B: −2.000 [−2.227, −1.773]: the interval excludes 0 (B is higher) at 3 seeds'
    >>> describe_difference("A − B", welch_difference([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]))
    'A − B: 0.000: every seed of both gave the same value, so there is no interval and no difference at 3 seeds'
    """
    seeds = f"{iv.n} seed{'s' if iv.n != 1 else ''}"
    if iv.n >= 2 and not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):  # n >= 2 each: zero spread on both sides
        what = "no difference" if iv.mean == 0.0 else "the same difference in every seed"
        return (f"{label}: {fmt_number(iv.mean, digits)}: every seed of both gave the same value, so there is no "
                f"interval and {what} at {seeds}")
    head = f"{label}: {describe_interval(iv, digits)}"
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return f"{head}: no interval at {seeds}, nothing can be said about a difference"
    if iv.excludes_zero:
        side = f"{names[0] if iv.lo > 0 else names[1]} is higher"
        return f"{head}: the interval excludes 0 ({side}) at {seeds}"
    return f"{head}: the interval includes 0, no difference shown at {seeds}"
