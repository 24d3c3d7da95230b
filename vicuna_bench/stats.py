"""The one comparison of two measurements: the nightly rule, ``vicuna-bench compare``, ``--perf-baseline``.

:func:`judge_change` judges "B against A" and every comparing front end
calls it.  One test decides whether two sample sets differ: the
Mann-Whitney U rank test (:func:`rank_test`), no assumption about the
latency distribution (a decode step's times are skewed, with stalls in the
tail).  A level moved when it is beyond a band *and* the rank test says the
samples moved that way (:func:`shift`); without samples on both sides, the
band alone decides.  :func:`ratio_interval` is the confidence interval that
goes with the test: the Hodges-Lehmann estimate of the ratio and its
distribution-free (Moses) interval, read off the same U statistic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

WORDS = ("faster", "slower", "same", "undecided")


@dataclasses.dataclass(frozen=True)
class RankTest:
    """A Mann-Whitney U test of samples x against y: U and the one-sided p-values (normal approximation)."""

    u: float  # pairs (x_i, y_j) with x_i > y_j, ties counted one half
    n: int  # len(x)
    m: int  # len(y)
    p_greater: float  # p that x is not stochastically larger than y (small: x tends larger)
    p_less: float  # the other tail (small: x tends smaller)


def _tie_term(sorted_values: Sequence[float]) -> float:
    """sum(t^3 - t) over the groups of tied values of a sorted sequence."""
    ties, i, total = 0.0, 0, len(sorted_values)
    while i < total:
        j = i
        while j + 1 < total and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    return ties


def _u_variance(n: int, m: int, ties: float) -> float:
    total = n + m
    return n * m / 12 * ((total + 1) - ties / (total * (total - 1))) if total > 1 else 0.0


def rank_test(x: Sequence[float], y: Sequence[float]) -> RankTest:
    """Mann-Whitney U of x against y, with tie-corrected variance and a continuity correction.

    U from the rank sum of x (average ranks for ties): U = R_x - n (n + 1) / 2.
    Var U = n m / 12 x ((N + 1) - sum(t^3 - t) / (N (N - 1))), N = n + m,
    t the size of each group of tied values.  p = 1 - Phi((U - n m / 2 - 1/2) / sd)
    for "x larger"; the other tail with + 1/2.  Good for n, m >= ~8 (the
    exact distribution is enumerable below that; min_p() bounds it).
    """
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("rank_test needs samples on both sides")
    pooled = sorted([(float(v), 0) for v in x] + [(float(v), 1) for v in y])
    total = n + m
    rank_sum_x = 0.0
    i = 0
    while i < total:
        j = i
        while j + 1 < total and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        average_rank = (i + j) / 2 + 1  # ranks are 1-based
        rank_sum_x += average_rank * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        i = j + 1
    u = rank_sum_x - n * (n + 1) / 2
    mean = n * m / 2
    variance = _u_variance(n, m, _tie_term([v for v, _ in pooled]))
    if variance <= 0:  # every value tied: no evidence either way
        return RankTest(u, n, m, 1.0, 1.0)
    sd = math.sqrt(variance)
    p_greater = 0.5 * math.erfc((u - mean - 0.5) / sd / math.sqrt(2))
    p_less = 0.5 * math.erfc(-(u - mean + 0.5) / sd / math.sqrt(2))
    return RankTest(u, n, m, min(1.0, p_greater), min(1.0, p_less))


def min_p(n: int, m: int) -> float:
    """The smallest one-sided p any rank test of n against m samples can give: 1 / C(n + m, n) (no ties)."""
    if math.lgamma(n + m + 1) - math.lgamma(n + 1) - math.lgamma(m + 1) > 700:
        return 0.0  # C(n + m, n) beyond a float (300 steps against 7 x 300): not worth the big integer
    return 1.0 / math.comb(n + m, n)


@dataclasses.dataclass(frozen=True)
class Shift:
    """Where a level sits against a reference: direction +1 above, -1 below, 0 neither; the rank test's p."""

    direction: int
    p_value: float | None  # one-sided, in the direction the level moved (None: no samples)


def shift(level: float, reference: float, band: float, samples: Sequence[float] | None = None,
          reference_samples: Sequence[float] | None = None, alpha: float = 0.001) -> Shift:
    """The verdict of both the nightly rule and compare: moved when ``level`` is beyond ``reference x (1 +
    band)`` (or below ``reference / (1 + band)``) and, given samples, the one-sided rank test of ``samples``
    against ``reference_samples`` in that direction has p < ``alpha``."""
    if level > reference * (1 + band):
        direction = 1
    elif level < reference / (1 + band):
        direction = -1
    else:
        direction = 0
    p_value = None
    if samples is not None and reference_samples is not None:
        test = rank_test(samples, reference_samples)
        p_value = test.p_greater if level >= reference else test.p_less
        if p_value >= alpha:
            direction = 0
    return Shift(direction, p_value)


@dataclasses.dataclass(frozen=True)
class Change:
    """B against A: the verdict of :func:`judge_change`."""

    word: str  # one of WORDS
    direction: int  # +1 B's level above A's beyond the band (and significant), -1 below, 0 neither
    ratio: float  # level B / level A (inf when A's level is <= 0)
    ci: RatioInterval | None  # Hodges-Lehmann B / A and its interval; None without samples on both sides
    p_value: float | None  # the one-sided rank test's p in the direction B moved; None: not tested
    counts: tuple[int, int] | None  # (samples of A, samples of B) when both sides have samples
    reason: str = ""  # why same or undecided

    @property
    def judged(self) -> bool:
        return self.word != "undecided"


def judge_change(b: Sequence[float] | None, a: Sequence[float] | None, band: float, *,
                 level_b: float | None = None, level_a: float | None = None, better: str = "lower",
                 alpha: float = 0.001, confidence: float | None = 0.95) -> Change:
    """Is B faster, slower or the same as A?  The one comparison of the package.

    ``b``, ``a``: the samples of each side (any positive unit, e.g. ms), or
    None where a side kept none.  ``level_b``, ``level_a``: the figures whose
    ratio is judged (default: each side's sample median).  ``band``: how far
    (0.10 = 10%) B's level must move past A's, ``level_b > level_a x (1 +
    band)`` or ``< level_a / (1 + band)``.  With samples on both sides, the
    one-sided Mann-Whitney test of ``b`` against ``a`` in that direction must
    also give p < ``alpha``, and ``ci`` is the Hodges-Lehmann B / A interval
    at ``confidence`` (None: not computed, or a sample <= 0).  Without
    samples on both sides the band alone decides.  ``better``: ``lower`` (a
    latency: above is slower) or ``higher`` (a throughput: above is faster).
    Undecided: A's level <= 0, or too few samples for the test to reach
    ``alpha``.

    Callers: the nightly rule (B this run, A the baseline runs pooled),
    ``vicuna-bench compare`` (B against A, alpha half of 1 - confidence),
    ``--perf-baseline`` (levels only: a CSV keeps no samples) and pytest's
    ``--benchmark-compare-fail`` (B this session's rounds, A the saved run's).
    """
    level_b = _level(level_b, b, "B")
    level_a = _level(level_a, a, "A")
    ratio = level_b / level_a if level_a > 0 else math.inf
    sampled = a is not None and b is not None and len(a) > 0 and len(b) > 0
    counts = (len(a), len(b)) if sampled else None
    if level_a <= 0:
        return Change("undecided", 0, ratio, None, None, counts, f"A's level {level_a:g}: no ratio")
    positive = sampled and min(min(a), min(b)) > 0  # the interval is on logs; the rank test takes any values
    ci = ratio_interval(b, a, confidence) if positive and confidence is not None else None
    if sampled and min_p(len(b), len(a)) >= alpha:
        return Change("undecided", 0, ratio, ci, None, counts,
                      f"{len(a)} vs {len(b)} samples: too few for the rank test (p >= {alpha:g} at best)")
    moved = shift(level_b, level_a, band, b if sampled else None, a if sampled else None, alpha)
    if moved.direction == 0:
        why = (f"p >= {alpha:g}" if moved.p_value is not None and moved.p_value >= alpha
               else f"within the {band:.0%} minimum effect")
        return Change("same", 0, ratio, ci, moved.p_value, counts, why)
    up = "slower" if better == "lower" else "faster"
    down = "faster" if better == "lower" else "slower"
    return Change(up if moved.direction > 0 else down, moved.direction, ratio, ci, moved.p_value, counts)


def _level(level: float | None, samples: Sequence[float] | None, side: str) -> float:
    if level is not None:
        return float(level)
    if samples is None or len(samples) == 0:
        raise ValueError(f"judge_change: side {side} needs a level or samples")
    return float(np.median(np.asarray(samples, dtype=np.float64)))


@dataclasses.dataclass(frozen=True)
class RatioInterval:
    """The typical ratio x / y (Hodges-Lehmann) and its confidence interval, from the rank test's U."""

    estimate: float
    low: float
    high: float
    confidence: float  # e.g. 0.95


def ratio_interval(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> RatioInterval:
    """Hodges-Lehmann estimate of x / y with its Moses confidence interval (positive samples, e.g. ms).

    On logs, d_ij = log x_i - log y_j: the estimate is exp(median d), the
    interval exp(d_(k)) .. exp(d_(nm + 1 - k)) with k = floor(nm/2 - z sd_U),
    z the normal quantile of (1 + confidence) / 2 and sd_U the rank test's
    tie-corrected standard deviation of U: the interval excludes 1 exactly
    when the two-sided rank test (without continuity correction) rejects at
    1 - confidence.  k < 1 (too few samples): the interval is 0 .. inf.
    """
    lx, ly = _logs(x, "x"), _logs(y, "y")
    n, m = len(lx), len(ly)
    pairs = n * m
    ly.sort()
    estimate = (_kth_difference(lx, ly, (pairs + 1) // 2) + _kth_difference(lx, ly, pairs // 2 + 1)) / 2
    z = math.sqrt(2) * _erfinv(confidence)
    sd = math.sqrt(_u_variance(n, m, _tie_term(sorted(np.concatenate([lx, ly]).tolist()))))
    k = math.floor(pairs / 2 - z * sd)
    if k < 1:
        return RatioInterval(math.exp(estimate), 0.0, math.inf, confidence)
    low, high = _kth_difference(lx, ly, k), _kth_difference(lx, ly, pairs + 1 - k)
    return RatioInterval(math.exp(estimate), math.exp(low), math.exp(high), confidence)


def _logs(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError(f"ratio_interval needs samples in {name}")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"ratio_interval needs finite positive samples in {name}")
    return np.log(array)


def _count_at_most(lx: np.ndarray, ly_sorted: np.ndarray, d: float) -> int:
    """How many pairs have lx_i - ly_j <= d."""
    # lx_i - ly_j <= d  <=>  ly_j >= lx_i - d
    return int((len(ly_sorted) - np.searchsorted(ly_sorted, lx - d, side="left")).sum())


def _kth_difference(lx: np.ndarray, ly_sorted: np.ndarray, k: int) -> float:
    """The k-th smallest (1-based) of the n x m differences lx_i - ly_j, exactly, without an n x m array
    (20 000 decode steps a side would be 400 million pairs): bisect on the value until few pairs are left
    between the bounds, then sort those."""
    lo = float(lx.min() - ly_sorted[-1]) - 1.0  # below every difference: count 0
    hi = float(lx.max() - ly_sorted[0])  # the largest difference: count n m
    count_lo = 0
    enough = 8 * (len(lx) + len(ly_sorted))
    while _count_at_most(lx, ly_sorted, hi) - count_lo > enough:
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        count_mid = _count_at_most(lx, ly_sorted, mid)
        if count_mid >= k:
            hi = mid
        else:
            lo, count_lo = mid, count_mid
    # The pairs with lo < d <= hi: for each x_i, the y_j with lx_i - hi <= ly_j < lx_i - lo.
    first = np.searchsorted(ly_sorted, lx - hi, side="left")
    last = np.searchsorted(ly_sorted, lx - lo, side="left")
    between = np.concatenate([lx[i] - ly_sorted[first[i]:last[i]] for i in range(len(lx))])
    between = between[(between > lo) & (between <= hi)]
    return float(np.sort(between)[k - count_lo - 1])


def _erfinv(p: float) -> float:
    """Inverse error function for 0 < p < 1, by Newton's method on math.erf (no scipy in the runtime)."""
    if not 0 < p < 1:
        raise ValueError(f"confidence {p}: must be between 0 and 1")
    y = 0.0
    for _ in range(100):
        step = (math.erf(y) - p) / (2 / math.sqrt(math.pi) * math.exp(-y * y))
        y -= step
        if abs(step) < 1e-15:
            break
    return y
