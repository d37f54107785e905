"""The statistics of `twinrt ab report`: pure functions over plain numbers, no I/O.

Outcomes are numbers per request, higher is better: a label is good = 1, bad = 0; a score is used as given.
A set of outcomes is *binary* when every one is 0 or 1 (all labels, or scores that are only 0 and 1).

    per arm, binary      mean = k/n, 95% Wilson score interval                         wilson(k, n)
    per arm, scores      mean, 95% bootstrap percentile interval (seeded)                bootstrap_ci(...)
    treatment − control, binary   Newcombe's hybrid score interval (his method 10)       newcombe(...)
                                  two-sided p of the pooled two-proportion z-test       two_proportion_p(...)
    treatment − control, scores   Welch's t interval and two-sided p (Welch–Satterthwaite df)   welch(...)
    latency p50, tokens/s         bootstrap percentile intervals (seeded)               bootstrap_ci(...)
    n per arm for an effect δ     binary: Fleiss without continuity correction; scores: 2 (z_a + z_b)² σ² / δ²

A bootstrap draws `resamples` index rows from a fresh numpy.random.default_rng(seed), in order, each row
`rng.integers(0, n, size=n)` (a two-sample statistic draws the control's rows, then the treatment's), and
takes the linear-interpolated percentiles (alpha/2, 1 − alpha/2) of the statistic over the rows: the same seed
gives the same interval.

A comparison is decided (`verdict`) when p < alpha and the interval excludes 0; otherwise it needs more data
while either arm has fewer outcomes than the sample size for the minimum detectable effect, and has found no
difference of that size once both have enough.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

Interval = tuple[float, float]
BOOTSTRAP_CELLS = 1 << 22  # index cells drawn at once (rows × n), so a long log bootstraps in bounded memory
_CF_ITERATIONS, _CF_EPS = 400, 1e-15


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 ≤ q ≤ 100) with linear interpolation between order statistics; None if empty."""
    if not len(values):
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def z_quantile(p: float) -> float:
    """Φ⁻¹(p) of the standard normal."""
    return NormalDist().inv_cdf(p)


# ---- proportions -------------------------------------------------------------------------------------------------


def wilson(k: int, n: int, alpha: float = 0.05) -> Interval | None:
    """Wilson's score interval of k successes in n: (p̂ + z²/2n ± z √(p̂q̂/n + z²/4n²)) / (1 + z²/n)."""
    if n <= 0:
        return None
    z = z_quantile(1 - alpha / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def newcombe(k1: int, n1: int, k2: int, n2: int, alpha: float = 0.05) -> Interval | None:
    """Newcombe's hybrid score interval of p2 − p1 (arm 2 minus arm 1) from the two Wilson intervals:
    [d − √((p2 − l2)² + (u1 − p1)²), d + √((u2 − p2)² + (p1 − l1)²)]."""
    w1, w2 = wilson(k1, n1, alpha), wilson(k2, n2, alpha)
    if w1 is None or w2 is None:
        return None
    (l1, u1), (l2, u2) = w1, w2
    p1, p2 = k1 / n1, k2 / n2
    d = p2 - p1
    return d - math.hypot(p2 - l2, u1 - p1), d + math.hypot(u2 - p2, p1 - l1)


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float | None:
    """Two-sided p of the pooled z-test of p1 = p2: z = (p2 − p1) / √(p̄ (1 − p̄) (1/n1 + 1/n2))."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    d = k2 / n2 - k1 / n1
    if se == 0:
        return 1.0  # every outcome is the same: no difference
    return math.erfc(abs(d / se) / math.sqrt(2))


# ---- Student's t -------------------------------------------------------------------------------------------------


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, _CF_ITERATIONS + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < _CF_EPS:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_cf(a, b, x) / a
    return 1 - front * _beta_cf(b, a, 1 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with df degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p ≥ 0.5) of Student's t, by bisection on t_two_sided_p."""
    target = 2 * (1 - p)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > target else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Welch:
    diff: float      # mean(treatment) − mean(control)
    ci: Interval
    p: float
    df: float


def welch(control: Sequence[float], treatment: Sequence[float], alpha: float = 0.05) -> Welch | None:
    """Welch's unequal-variance t: se = √(s1²/n1 + s2²/n2), df by Welch–Satterthwaite, CI d ± t_{1−α/2,df}·se.
    None with fewer than 2 values in an arm."""
    n1, n2 = len(control), len(treatment)
    if n1 < 2 or n2 < 2:
        return None
    m1, m2 = sum(control) / n1, sum(treatment) / n2
    v1 = sum((x - m1) ** 2 for x in control) / (n1 - 1)
    v2 = sum((x - m2) ** 2 for x in treatment) / (n2 - 1)
    d = m2 - m1
    se2 = v1 / n1 + v2 / n2
    if se2 == 0:  # both arms constant: the difference is exact
        return Welch(d, (d, d), 1.0 if d == 0 else 0.0, float(n1 + n2 - 2))
    df = se2 ** 2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    half = t_quantile(1 - alpha / 2, df) * math.sqrt(se2)
    return Welch(d, (d - half, d + half), t_two_sided_p(d / math.sqrt(se2), df), df)


# ---- the bootstrap -----------------------------------------------------------------------------------------------


def bootstrap_rows(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """`resamples` rows of n indices drawn with replacement, in order (drawn in blocks of bounded size, which
    gives the same numbers as one row at a time)."""
    block = max(1, BOOTSTRAP_CELLS // max(n, 1))
    parts = [rng.integers(0, n, size=(min(block, resamples - i), n)) for i in range(0, resamples, block)]
    return np.concatenate(parts) if parts else np.empty((0, n), dtype=np.int64)  # [resamples, n]


def bootstrap_ci(samples: Sequence[np.ndarray], stat: Callable[..., np.ndarray], resamples: int = 2000,
                 seed: int = 0, alpha: float = 0.05) -> Interval | None:
    """Percentile interval of `stat` over bootstrap resamples. `samples`: one array per independent sample, each
    [n_i] or [n_i, k] (rows resampled together: latency with its tokens); `stat(*resampled)` gets one array per
    sample of shape [resamples, n_i(, k)] and returns [resamples]. None if a sample is empty."""
    if any(len(s) == 0 for s in samples):
        return None
    rng = np.random.default_rng(seed)
    drawn = [np.asarray(s)[bootstrap_rows(rng, len(s), resamples)] for s in samples]
    values = np.asarray(stat(*drawn), dtype=np.float64)  # [resamples]
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0, alpha: float = 0.05) -> Interval | None:
    return bootstrap_ci([np.asarray(values, dtype=np.float64)], lambda x: x.mean(axis=1), resamples, seed, alpha)


def median_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0, alpha: float = 0.05) -> Interval | None:
    return bootstrap_ci([np.asarray(values, dtype=np.float64)], lambda x: np.quantile(x, 0.5, axis=1), resamples,
                        seed, alpha)


def rate_ci(tokens: Sequence[float], seconds: Sequence[float], resamples: int = 2000, seed: int = 0,
            alpha: float = 0.05) -> Interval | None:
    """Interval of Σ tokens / Σ seconds, requests resampled whole."""
    pairs = np.stack([np.asarray(tokens, dtype=np.float64), np.asarray(seconds, dtype=np.float64)], axis=1)
    if not len(pairs) or pairs[:, 1].sum() <= 0:
        return None

    def rate(x: np.ndarray) -> np.ndarray:  # x: [R, n, 2]
        secs = x[..., 1].sum(axis=1)
        return np.where(secs > 0, x[..., 0].sum(axis=1) / np.where(secs > 0, secs, 1), np.nan)

    return bootstrap_ci([pairs], rate, resamples, seed, alpha)


# ---- sample sizes ------------------------------------------------------------------------------------------------


def n_two_proportions(p1: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per arm, to detect p2 = p1 ± mde (toward the middle when p1 + mde > 1) with a two-sided test at alpha:
    [z_{1−α/2} √(2 p̄ q̄) + z_{power} √(p1 q1 + p2 q2)]² / mde² (Fleiss, no continuity correction)."""
    p2 = p1 + mde if p1 + mde <= 1 else p1 - mde
    pbar = (p1 + p2) / 2
    za, zb = z_quantile(1 - alpha / 2), z_quantile(power)
    root = za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return max(2, math.ceil(root * root / (mde * mde)))


def n_two_means(sd: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per arm, to detect a difference of means mde with a two-sided test at alpha: 2 (z_{1−α/2} + z_power)² σ² / δ²."""
    za, zb = z_quantile(1 - alpha / 2), z_quantile(power)
    return max(2, math.ceil(2 * (za + zb) ** 2 * sd * sd / (mde * mde)))


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float | None:
    """√ of the pooled sample variance of two samples; None with fewer than 3 values in all."""
    dof = len(a) + len(b) - 2
    if dof < 1:
        return None
    ss = sum(sum((x - sum(s) / len(s)) ** 2 for x in s) for s in (a, b) if s)
    return math.sqrt(ss / dof)


# ---- one comparison ----------------------------------------------------------------------------------------------


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


@dataclass(frozen=True)
class Comparison:
    """arm − control on the outcome: the difference of means, its interval and two-sided p (None while an arm
    has too few outcomes), the outcomes per arm the test needs for `mde`, and the verdict line."""

    arm: str
    control: str
    n_arm: int
    n_control: int
    diff: float | None
    ci: Interval | None
    p: float | None
    method: str
    needed_per_arm: int | None
    decided: bool
    verdict: str


def compare(arm: str, control: str, treated: Sequence[float], base: Sequence[float], binary: bool, mde: float,
            alpha: float = 0.05, power: float = 0.8) -> Comparison:
    """`treated` (arm) against `base` (control); binary outcomes by Newcombe + z-test, scores by Welch's t."""
    n1, n2 = len(base), len(treated)
    diff = ci = p = needed = None
    if binary:
        method = "Newcombe hybrid score interval, pooled two-proportion z-test"
        k1, k2 = int(sum(base)), int(sum(treated))
        if n1 and n2:
            diff, ci, p = k2 / n2 - k1 / n1, newcombe(k1, n1, k2, n2, alpha), two_proportion_p(k1, n1, k2, n2)
        rate = k1 / n1 if n1 else k2 / n2 if n2 else 0.5
        needed = n_two_proportions(rate, mde, alpha, power)
    else:
        method = "Welch's t (interval and p)"
        w = welch(base, treated, alpha)
        if w is not None:
            diff, ci, p = w.diff, w.ci, w.p
        sd = pooled_sd(base, treated)
        needed = n_two_means(sd, mde, alpha, power) if sd else None
    decided = p is not None and ci is not None and p < alpha and (ci[0] > 0 or ci[1] < 0)
    return Comparison(arm, control, n2, n1, diff, ci, p, method, needed, decided,
                      verdict(arm, control, n2, n1, diff, ci, p, needed, decided, mde))


def format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _effect(diff: float, ci: Interval) -> str:
    return f"{diff:+.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def verdict(arm: str, control: str, n_arm: int, n_control: int, diff: float | None, ci: Interval | None,
            p: float | None, needed: int | None, decided: bool, mde: float) -> str:
    """One plain line: who beats whom by how much, or how much data the comparison still needs."""
    known = diff is not None and ci is not None and p is not None
    if decided and known:
        winner, loser, d, (lo, hi) = (arm, control, diff, ci) if diff > 0 else (control, arm, -diff, (-ci[1], -ci[0]))
        return f"{winner} beats {loser} by {_effect(d, (lo, hi))}, {format_p(p)}"
    has = min(n_arm, n_control)
    now = f"{_effect(diff, ci)}, {format_p(p)}" if known else ""
    if needed is None:
        return (f"not enough data yet: {arm} vs {control} has {n_arm} and {n_control} outcomes; the sample size "
                "needs the outcomes' spread (at least 3 in all, not all equal)" + (f" (now {now})" if now else ""))
    if has < needed or not known:
        return f"not enough data yet: {arm} vs {control} needs ~{needed} per arm, has {has}" + (
            f" (now {now})" if now else "")
    return f"no difference of {mde:g} or more: {arm} vs {control} {now}, with {has} per arm (~{needed} detect {mde:g})"
