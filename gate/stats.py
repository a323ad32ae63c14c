"""Paired statistics for comparing a checkpoint with the base, item by item.

Pure: numpy and scipy only, no I/O, no clock; randomness comes from the ``numpy.random.Generator``
passed in. Every comparison is *paired*: base and checkpoint are scored on the same items, and the
uncertainty comes from resampling or conditioning on items, which removes the between-item
variance that unpaired tests (such as lm-eval's comparison script) leave in (Miller 2024,
"Adding Error Bars to Evals", section 4; Dror et al. 2018, "The Hitchhiker's Guide to Testing
Statistical Significance in NLP").

Conventions: ``effect`` is the checkpoint's change on the gate's scale (``relative``: value_c /
value_b - 1; else value_c - value_b). Tests are one-sided against a threshold ``t``:
``p_above`` is the p-value of H0: effect <= t against H1: effect > t, and ``p_below`` of
H0: effect >= t against H1: effect < t. Bounds are one-sided at a given level each (the level
the decision used: gate.policy), so [low, high] is a (1 - 2 level) two-sided interval, and a bound
lies beyond a threshold exactly when the matching test rejects at that level.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special
from scipy import stats as sps

DEFAULT_ITERATIONS = 10_000
POWER = 0.8
_CHUNK_CELLS = 2_000_000  # replicates x units per chunk: bounds the memory of one bootstrap


@dataclass(frozen=True)
class Estimate:
    """A paired comparison of one metric: point estimate, one-sided bounds and what is needed to test."""

    base: float
    """The base's value of the metric on these items."""
    value: float
    """The checkpoint's value on the same items."""
    effect: float
    """value / base - 1 (relative) or value - base (absolute)."""
    low: float | None
    """One-sided lower confidence bound of the effect at ``level`` (None: the data cannot give one)."""
    high: float | None
    """One-sided upper confidence bound of the effect at ``level`` (None: the data cannot give one)."""
    se: float
    """Standard error of the effect (delta method over items or clusters, or the analytic paired one)."""
    n: int
    """Number of paired items."""
    method: str
    """``score`` (Tango), ``mcnemar`` (margin 0), ``bootstrap-t``, ``binomial`` (0/1 floors)."""
    mcnemar_p: float | None = None
    """McNemar's exact two-sided p-value of 'no difference' (binary metrics only)."""
    level: float = 0.05
    """One-sided level of ``low`` and ``high``."""
    degenerate: bool = False
    """The per-item changes show no spread (every item changed by the same amount): nothing can be certified."""
    dispersion: float = 0.0
    """Per-unit variance of the effect (n * se^2; 0/1 metrics: the discordance rate): sizes a suite."""
    units: int = 0
    """Independent units resampled: items, or clusters when the items are clustered."""


def _contrast(t: float, relative: bool) -> np.ndarray:
    """Coefficients a_k over the cells (11, 10, 01, 00) such that H0 "effect = t" is sum_k a_k p_k = 0.

    Cells: 11 both right, 10 base right and checkpoint wrong, 01 the reverse, 00 both wrong.
    Absolute: d = p01 - p10 = t. Relative: acc_c = (1 + t) acc_b, acc_c = p11 + p01, acc_b = p11 + p10.
    """
    if relative:
        return np.array([-t, -(1.0 + t), 1.0, 0.0])
    return np.array([-t, -1.0 - t, 1.0 - t, -t])


def score_statistic(counts, a, correction: float = 0.5):
    """Score statistics of H0: sum_k a_k p_k = 0 for multinomial cell counts (vectorised over tables).

    The restricted maximum-likelihood estimate under the linear constraint is
    p~_k = n_k / (n (1 + lambda a_k)), lambda the root of sum_k n_k a_k / (1 + lambda a_k) = 0 within
    1 + lambda a_k >= 0 for every cell; when the root lies on that boundary (no observed item on one
    side of the constraint, e.g. no discordant item), the remaining mass goes to the empty cell that
    bounds it. Then, with S = sum_k n_k a_k and V = n sum_k a_k^2 p~_k (the variance of S under H0),

        z_up = (S - c) / sqrt(V)    (large: the contrast is > 0),   z_down = (S + c) / sqrt(V)

    with continuity correction c (1/2). For the absolute difference this is Tango's score test for
    paired proportions (Tango 1998, Stat Med 17:891-908, whose closed form it reproduces); for the
    ratio acc_c / acc_b it is the score test of Tang, Tang & Chan (2003, Biometrical J 45:5).
    Returns (z_up, z_down), each +-inf when V = 0 and S -+ c is not 0, else 0 there.
    """
    counts = np.asarray(counts, dtype=float)
    a = np.broadcast_to(np.asarray(a, dtype=float), counts.shape)
    n = counts.sum(-1)
    big = np.where(a > 0, a, 0).max(-1)
    small = np.where(a < 0, a, 0).min(-1)
    lo = np.where(big > 0, -1.0 / np.where(big > 0, big, 1), -1e12)
    hi = np.where(small < 0, -1.0 / np.where(small < 0, small, -1), 1e12)
    observed = counts > 0

    def h(lam):
        denom = 1.0 + lam[..., None] * a
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(observed, counts * a / np.where(observed, denom, 1.0), 0.0)
        return terms.sum(-1)

    left, right = lo.copy(), hi.copy()
    for _ in range(64):  # bisection: h decreases in lambda; 64 halvings reach double precision
        mid = (left + right) / 2
        value = h(mid)
        left = np.where(value > 0, mid, left)
        right = np.where(value > 0, right, mid)
    lam = (left + right) / 2
    lam = np.where(h(lo) <= 0, lo, np.where(h(hi) >= 0, hi, lam))
    denom = 1.0 + lam[..., None] * a
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(observed, counts / (np.where(n > 0, n, 1)[..., None] * np.where(observed, denom, 1.0)), 0.0)
    leftover = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    edge = np.argmin(np.where(observed, np.inf, denom), axis=-1)  # the empty cell at its boundary
    p = p + leftover[..., None] * (np.arange(counts.shape[-1]) == edge[..., None])
    mean = (a * p).sum(-1)
    var = n * ((a * a * p).sum(-1) - mean * mean)
    s = (counts * a).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(np.maximum(var, 0.0))
        up = np.where(sd > 0, (s - correction) / sd, np.sign(np.round(s - correction, 12)) * np.inf)
        down = np.where(sd > 0, (s + correction) / sd, np.sign(np.round(s + correction, 12)) * np.inf)
    return np.nan_to_num(up, nan=0.0), np.nan_to_num(down, nan=0.0)


def binary_p_values(counts, t: float, relative: bool):
    """(p_above, p_below) of paired 0/1 tables ``counts`` (..., 4: n11, n10, n01, n00) at threshold t.

    p_above tests H0: effect <= t, p_below H0: effect >= t. At t = 0 (no margin) this is McNemar's
    exact test: conditional on the m = n01 + n10 discordant items, n01 ~ Bin(m, 1/2) under H0, so
    p_above = P(X >= n01) and p_below = P(X <= n01) (1 when m = 0). With a margin it is the
    continuity-corrected score test (``score_statistic``), valid unconditionally: the discordance
    rate is estimated, not assumed known, and no discordant item never gives p = 0.
    """
    counts = np.asarray(counts, dtype=float)
    if t == 0:
        n01, m = counts[..., 2], counts[..., 1] + counts[..., 2]
        return sps.binom.sf(n01 - 1, m, 0.5), sps.binom.cdf(n01, m, 0.5)
    if t <= -1 or (t >= 1 and not relative):
        # The effect cannot reach t (a drop of more than everything): one null hypothesis is empty.
        shape = counts.shape[:-1]
        return (np.zeros(shape), np.ones(shape)) if t <= -1 else (np.ones(shape), np.zeros(shape))
    up, down = score_statistic(counts, _contrast(t, True)) if relative else tango_statistic(counts, t)
    return special.ndtr(-up), special.ndtr(down)  # the normal tails (scipy.special: fast on small arrays)


def tango_statistic(counts, t, correction: float = 0.5):
    """``score_statistic`` for the absolute difference in Tango's closed form (Tango 1998, eq. 4-6).

    With b = n01, c = n10 and H0: p01 - p10 = t, the restricted MLE of p10 is the root
    p~ = (-B + sqrt(B^2 - 4AC)) / (2A) with A = 2n, B = -b - c + (2n - b + c) t, C = -c t (1 - t), and
    Var(b - c) = n (2 p~ + t - t^2). Vectorised over tables and thresholds.
    """
    counts = np.asarray(counts, dtype=float)
    b, c = counts[..., 2], counts[..., 1]
    n = counts.sum(-1)
    A, B, C = 2 * n, -b - c + (2 * n - b + c) * t, -c * t * (1 - t)
    p10 = (-B + np.sqrt(np.maximum(B * B - 4 * A * C, 0.0))) / (2 * A)
    sd = np.sqrt(np.maximum(n * (2 * p10 + t - t * t), 0.0))
    s = b - c - n * t
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(sd > 0, (s - correction) / sd, np.sign(np.round(s - correction, 12)) * np.inf)
        down = np.where(sd > 0, (s + correction) / sd, np.sign(np.round(s + correction, 12)) * np.inf)
    return np.nan_to_num(up, nan=0.0), np.nan_to_num(down, nan=0.0)


class PairedBinary:
    """Paired 0/1 outcomes (acc, exact_match): McNemar at margin 0, Tango's score test with a margin.

    With n items, n01 items wrong for the base and right for the checkpoint, n10 the reverse, the
    accuracy difference is d = (n01 - n10) / n (relative: acc_c / acc_b - 1). Tests are
    ``binary_p_values``; bounds invert the same test, so a bound lies inside the margin exactly
    when the test passes: with a margin the score interval (Tango 1998; Tang et al. 2003 for
    ratios), at margin 0 the exact conditional Clopper-Pearson bound of theta = p01 / (p01 + p10)
    mapped to d = (m / n)(2 theta - 1), whose sign is McNemar's decision (McNemar 1947).
    Exact size, enumerated over every outcome (tests/test_stats.py): at most 1.03 alpha (0.0502 at
    alpha = 0.05) on a grid of n 10-1000, discordance 2-60% and margins from 0 up to the
    discordance, at alpha 0.05 and 0.01; without the continuity correction it reached 0.069.
    """

    def __init__(self, base, checkpoint, relative: bool = False):
        base, checkpoint = np.asarray(base, dtype=float), np.asarray(checkpoint, dtype=float)
        if len(base) != len(checkpoint) or len(base) == 0:
            raise ValueError("paired binary test needs equally long, non-empty arrays")
        if not (np.isin(base, (0.0, 1.0)).all() and np.isin(checkpoint, (0.0, 1.0)).all()):
            raise ValueError("paired binary test needs 0/1 values")
        self.n = len(base)
        self.n01 = int(np.sum((base == 0) & (checkpoint == 1)))
        self.n10 = int(np.sum((base == 1) & (checkpoint == 0)))
        self.n11 = int(np.sum((base == 1) & (checkpoint == 1)))
        self.m = self.n01 + self.n10
        self.counts = np.array([self.n11, self.n10, self.n01, self.n - self.n11 - self.m], dtype=float)
        self.base_value = float(base.mean())
        self.value = float(checkpoint.mean())
        self.relative = relative
        if relative and self.base_value == 0:
            raise ValueError("a relative effect needs a base accuracy above 0")
        self.effect = self.value / self.base_value - 1 if relative else (self.n01 - self.n10) / self.n

    def p_above(self, t: float) -> float:
        """p-value of H0: effect <= t."""
        return float(binary_p_values(self.counts, t, self.relative)[0])

    def p_below(self, t: float) -> float:
        """p-value of H0: effect >= t."""
        return float(binary_p_values(self.counts, t, self.relative)[1])

    def _invert(self, level: float, side: int) -> float:
        """The bound that inverts the score test: side +1 the lower (p_above), -1 the upper (p_below).

        p_above(t) increases with t and p_below(t) decreases, so the bound is where the p-value
        crosses ``level``; found on a grid over the effect's whole range, refined four times.
        """
        lo, hi = -1.0, (1.0 / self.base_value - 1.0 if self.relative else 1.0)
        for rounds in range(4):
            grid = np.linspace(lo, hi, 65)
            if rounds == 0:
                grid = grid[1:-1]  # the ends are the edges of the parameter space
            if self.relative:
                a = np.stack([_contrast(t, True) for t in grid])
                up, down = score_statistic(np.broadcast_to(self.counts, a.shape), a)
            else:
                up, down = tango_statistic(np.broadcast_to(self.counts, (len(grid), 4)), grid)
            kept = (special.ndtr(-up) if side > 0 else special.ndtr(down)) > level  # not rejected
            if side > 0:
                if kept.all():
                    return float(lo if rounds == 0 else grid[0])
                if not kept.any():
                    return float(hi if rounds == 0 else grid[-1])
                first = int(np.argmax(kept))
                lo, hi = (grid[first - 1], grid[first]) if first > 0 else (lo, grid[0])
            else:
                if kept.all():
                    return float(hi if rounds == 0 else grid[-1])
                if not kept.any():
                    return float(lo if rounds == 0 else grid[0])
                last = len(grid) - 1 - int(np.argmax(kept[::-1]))
                lo, hi = (grid[last], grid[last + 1]) if last < len(grid) - 1 else (grid[-1], hi)
        return float((lo + hi) / 2)

    def estimate(self, level: float, threshold: float = 0.0) -> Estimate:
        """Bounds at one-sided ``level`` by the test used at ``threshold`` (McNemar's at 0, else the score test)."""
        # Two-sided exact test of theta = 1/2: twice the smaller tail (the null distribution is symmetric).
        tail = min(sps.binom.cdf(self.n01, self.m, 0.5), sps.binom.sf(self.n01 - 1, self.m, 0.5)) if self.m else 0.5
        mcnemar = float(min(1.0, 2 * tail))
        if threshold == 0:
            low, high = _conditional_bounds(self.n01, self.n10, self.n, level)
            if self.relative:
                low, high = low / self.base_value, high / self.base_value
            method = "mcnemar"
        else:
            low, high = self._invert(level, +1), self._invert(level, -1)
            method = "score"
        d = (self.n01 - self.n10) / self.n
        scale = self.base_value if self.relative else 1.0
        # Var(d) = (p01 + p10 - (p01 - p10)^2) / n, with the observed proportions plugged in; at least
        # one discordant item, so that no discordance never plans with a zero standard error.
        se = math.sqrt(max(max(self.m, 1) / self.n - d * d, 1.0 / self.n**2) / self.n) / scale
        return Estimate(
            base=self.base_value,
            value=self.value,
            effect=float(self.effect),
            low=low,
            high=high,
            se=float(se),
            n=self.n,
            method=method,
            mcnemar_p=mcnemar,
            level=level,
            dispersion=max(self.m, 1) / self.n / scale**2,
            units=self.n,
        )


def _conditional_bounds(n01: int, n10: int, n: int, level: float) -> tuple[float, float]:
    """Clopper-Pearson bounds of theta = p01 / (p01 + p10) given m, mapped to d = (m / n)(2 theta - 1)."""
    m = n01 + n10
    if m == 0:
        return 0.0, 0.0
    theta_low = 0.0 if n01 == 0 else float(sps.beta.ppf(level, n01, n10 + 1))
    theta_high = 1.0 if n10 == 0 else float(sps.beta.ppf(1 - level, n01 + 1, n10))
    return (m / n) * (2 * theta_low - 1), (m / n) * (2 * theta_high - 1)


class PairedBootstrap:
    """Studentised (bootstrap-t) bootstrap over items, or clusters, of a ratio-of-sums metric.

    Each item i carries a base numerator b_i, a checkpoint numerator c_i and a denominator w_i
    (the same for both: token, byte or word counts, or 1 for plain means). The metric is

        value = f(R),  R = sum_i x_i / sum_i w_i

    with f = exp for perplexity (x = nll, w = tokens: exp of the token-weighted mean NLL, never an
    average of per-document perplexities), f(u) = u / ln 2 for bits per byte (w = bytes), and the
    identity for means (w = 1). The test works on theta = log(value_c / value_b) for relative
    effects (for perplexity theta = R_c - R_b, the log of the ratio) and on value_c - value_b for
    absolute ones. Its standard error comes from the delta method (the ratio estimator's
    linearisation): d_i = A (c_i - R_c w_i) - B (b_i - R_b w_i), A = dtheta/dR_c, B = -dtheta/dR_b,
    se^2 = n / (n - 1) * sum_i d_i^2 / (sum_i w_i)^2.

    One replicate draws n items with replacement (multinomial counts k_i), recomputes theta* and se*
    from the same draw and keeps T* = (theta* - theta) / se*. The one-sided p-value of H0: theta <= t
    is p_above(t) = (1 + #{T* >= (theta - t) / se}) / (B + 1) (Efron & Tibshirani 1993, ch. 12;
    Hall 1988: second-order accurate where the percentile interval is first-order). gate reports
    the larger of it and Student's t p-value of the same statistic with units - 1 degrees of freedom:
    in simulations at the margin (tests/test_policy.py) the bootstrap-t alone passed 6-7% of the
    time at alpha = 0.05 with heavy-tailed (t3) per-document changes, the larger of the two about
    5%. The bounds invert this p-value exactly: t < low exactly when p_above(t) <= level. With clusters (several items per passage or subject), the sums are
    taken per cluster first and clusters are resampled: the ratio is unchanged and the variance
    counts the items' correlation (Field & Welsh 2007). When every unit changed by the same amount
    (se = 0: one or two documents, identical models) the bootstrap has nothing to resample:
    ``degenerate`` is set and every p-value is 1.
    """

    def __init__(self, base, checkpoint, weights, transform: str, relative: bool, rng, iterations=DEFAULT_ITERATIONS, clusters=None):
        base, checkpoint, weights = (np.asarray(a, dtype=float) for a in (base, checkpoint, weights))
        if not (len(base) == len(checkpoint) == len(weights)) or len(base) == 0:
            raise ValueError("paired bootstrap needs equally long, non-empty base/checkpoint/weight arrays")
        self.n = len(base)
        self.relative = relative
        self._f, self._df = _TRANSFORMS[transform], _DERIVATIVES[transform]
        self.base_value = ratio_value(base, weights, transform)
        self.value = ratio_value(checkpoint, weights, transform)
        if relative and not (self.base_value > 0 and self.value > 0):
            raise ValueError("a relative effect needs positive base and checkpoint values")
        self.effect = self.value / self.base_value - 1.0 if relative else self.value - self.base_value
        if clusters is not None:
            base, checkpoint, weights = _cluster_sums(clusters, base, checkpoint, weights)
        self.units = len(base)
        self.theta, self.se = self._theta_se(base, checkpoint, weights, np.ones((1, self.units)))
        self.theta, self.se = float(self.theta[0]), float(self.se[0])
        scale = max(abs(self.theta), 1e-12)
        self.degenerate = self.units < 2 or not self.se > 1e-9 * scale
        stats = []
        if not self.degenerate:
            chunk = max(1, _CHUNK_CELLS // self.units)
            for start in range(0, iterations, chunk):
                k = rng.multinomial(self.units, np.full(self.units, 1.0 / self.units), size=min(chunk, iterations - start))
                theta, se = self._theta_se(base, checkpoint, weights, k)
                with np.errstate(divide="ignore", invalid="ignore"):
                    t = np.where(se > 0, (theta - self.theta) / se, np.sign(np.round(theta - self.theta, 12)) * np.inf)
                stats.append(t)
        self.t_stats = np.sort(np.concatenate(stats)) if stats else np.zeros(0)

    def _theta_se(self, b, c, w, k):
        """theta and its delta-method se for each row of item counts k (the observed data: all ones)."""
        sw = k @ w
        rb, rc = (k @ b) / sw, (k @ c) / sw
        fb, fc = self._f(rb), self._f(rc)
        if self.relative:
            theta = np.log(fc) - np.log(fb)
            da, db = self._df(rc) / fc, self._df(rb) / fb
        else:
            theta = fc - fb
            da, db = self._df(rc) * np.ones_like(rc), self._df(rb) * np.ones_like(rb)
        d = da[:, None] * (c[None, :] - rc[:, None] * w[None, :]) - db[:, None] * (b[None, :] - rb[:, None] * w[None, :])
        units = k.sum(1)
        ss = (k * d * d).sum(1) * units / np.maximum(units - 1, 1)
        return theta, np.sqrt(ss) / sw

    def _working(self, t: float) -> float:
        """A threshold on the effect, on theta's scale."""
        if self.relative:
            return math.log1p(t) if t > -1 else -math.inf
        return t

    def _effect_of(self, theta: float) -> float:
        return math.expm1(theta) if self.relative else theta

    def p_above(self, t: float) -> float:
        """p-value of H0: effect <= t (small when the effect is clearly above t)."""
        if self.degenerate:
            return 1.0
        observed = (self.theta - self._working(t)) / self.se
        exceed = len(self.t_stats) - np.searchsorted(self.t_stats, observed, side="left")
        return max((1 + int(exceed)) / (len(self.t_stats) + 1), float(sps.t.sf(observed, self.units - 1)))

    def p_below(self, t: float) -> float:
        """p-value of H0: effect >= t (small when the effect is clearly below t)."""
        if self.degenerate:
            return 1.0
        observed = (self.theta - self._working(t)) / self.se
        below = np.searchsorted(self.t_stats, observed, side="right")
        return max((1 + int(below)) / (len(self.t_stats) + 1), float(sps.t.cdf(observed, self.units - 1)))

    def _bounds(self, level: float) -> tuple[float | None, float | None]:
        """Bounds that invert the p-values: t < low exactly when p_above(t) <= level (and t > high for p_below)."""
        if self.degenerate:
            return None, None
        allowed = math.floor(level * (len(self.t_stats) + 1) + 1e-9) - 1  # exceedances a pass may have
        if allowed < 0:
            return None, None  # too few replicates to reach this level
        student = float(sps.t.isf(level, self.units - 1))
        low = self.theta - self.se * max(self.t_stats[len(self.t_stats) - 1 - allowed], student)
        high = self.theta - self.se * min(self.t_stats[allowed], -student)
        # Replicates with no spread give T* = +-inf: that side then has no finite bound.
        low_effect, high_effect = (self._effect_of(b) if math.isfinite(b) and abs(b) < 700 else None for b in (low, high))
        return low_effect, high_effect

    def estimate(self, level: float, threshold: float = 0.0) -> Estimate:
        low, high = self._bounds(level)
        slope = (1.0 + self.effect) if self.relative else 1.0  # d effect / d theta at the estimate
        se = self.se * slope
        return Estimate(
            base=float(self.base_value),
            value=float(self.value),
            effect=float(self.effect),
            low=low,
            high=high,
            se=float(se),
            n=self.n,
            method="bootstrap-t",
            level=level,
            degenerate=self.degenerate,
            dispersion=float(se * se * self.units),
            units=self.units,
        )


def _cluster_sums(clusters, *columns):
    """Per-cluster sums of each column, clusters in order of first appearance."""
    keys, index = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
    return tuple(np.bincount(index, weights=col, minlength=len(keys)) for col in columns)


class BinomialValue:
    """One 0/1 metric's own value against a fixed limit (floors): exact binomial tests.

    With k successes in n items: p_above(t) = P(X >= k | Bin(n, t)) (H0: accuracy <= t),
    p_below(t) = P(X <= k | Bin(n, t)); bounds are Clopper-Pearson's, which invert these tests.
    """

    def __init__(self, values):
        values = np.asarray(values, dtype=float)
        self.n = len(values)
        self.k = int(values.sum())

    def p_above(self, t: float) -> float:
        return 1.0 if t >= 1 else (0.0 if t < 0 else float(sps.binom.sf(self.k - 1, self.n, t)))

    def p_below(self, t: float) -> float:
        return 1.0 if t <= 0 else (0.0 if t > 1 else float(sps.binom.cdf(self.k, self.n, t)))

    def estimate(self, level: float, threshold: float = 0.0) -> Estimate:
        low, high = clopper_pearson(self.k, self.n, level)
        value = self.k / self.n
        var = max(value * (1 - value), 1.0 / self.n)
        return Estimate(
            math.nan, value, value, low, high, math.sqrt(var / self.n), self.n, "binomial", level=level, dispersion=var, units=self.n
        )


class ValueBootstrap:
    """One ratio-of-sums metric's own value against a fixed limit (floors): bootstrap-t.

    Implemented as a PairedBootstrap against a constant base whose numerators are 0, so that
    effect = value - f(0); thresholds and bounds are shifted back by f(0).
    """

    def __init__(self, values, weights, transform: str, rng, iterations=DEFAULT_ITERATIONS, clusters=None):
        self._paired = PairedBootstrap(np.zeros(len(values)), values, weights, transform, False, rng, iterations, clusters)
        self._shift = float(_TRANSFORMS[transform](0.0))
        self.n = self._paired.n

    def p_above(self, t: float) -> float:
        return self._paired.p_above(t - self._shift)

    def p_below(self, t: float) -> float:
        return self._paired.p_below(t - self._shift)

    def estimate(self, level: float, threshold: float = 0.0) -> Estimate:
        e = self._paired.estimate(level)

        def shift(x):
            return None if x is None else x + self._shift

        return Estimate(
            math.nan,
            e.value,
            e.value,
            shift(e.low),
            shift(e.high),
            e.se,
            e.n,
            e.method,
            level=level,
            degenerate=e.degenerate,
            dispersion=e.dispersion,
            units=e.units,
        )


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): controls the family-wise error rate.

    Sort p ascending: p_(1) <= ... <= p_(m); adjusted p_(j) = max_{i<=j} min(1, (m - i + 1) p_(i)).
    A hypothesis is rejected at level alpha when its adjusted p-value is <= alpha.
    """
    order = np.argsort(p_values, kind="stable")
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def holm_levels(p_values: list[float], alpha: float) -> list[float]:
    """The level Holm's procedure tests each hypothesis at (Holm 1979).

    Sorted ascending, p_(i) is tested at alpha / (m - i + 1) while every earlier one was rejected;
    from the first that is not, every later hypothesis keeps that step's level (none is rejected).
    So a hypothesis is rejected exactly when its p-value is <= its level, exactly when its
    adjusted p-value (``holm``) is <= alpha.
    """
    order = np.argsort(p_values, kind="stable")
    m = len(p_values)
    levels = [0.0] * m
    stopped = None
    for rank, index in enumerate(order):
        step = alpha / (m - rank)
        if stopped is None and p_values[index] > step:
            stopped = step
        levels[index] = step if stopped is None else stopped
    return levels


def z_quantile(level: float) -> float:
    """z_{1 - level}: the one-sided normal critical value."""
    return float(-special.ndtri(level))


def minimum_detectable_effect(se: float, level: float, power: float = POWER) -> float:
    """Smallest distance between the true effect and a gate's threshold that a one-sided test at
    ``level`` detects with probability ``power``:

        MDE = (z_{1-level} + z_{power}) * se

    (normal planning approximation; Miller 2024, "Adding Error Bars to Evals", section 5). gate
    uses level = alpha / F, F the number of hypotheses Holm corrects for (the family), the level
    the first, hardest step of Holm's procedure applies.
    """
    return float((z_quantile(level) + float(special.ndtri(power))) * se)


def items_needed(dispersion: float, distance: float, level: float, power: float = POWER) -> int | None:
    """Items (or clusters) for a one-sided level test to clear a threshold ``distance`` away with ``power``:

        n = (z_{1-level} + z_{power})^2 * dispersion / distance^2

    dispersion: per-item variance of the effect; for 0/1 metrics the discordance rate psi (the
    variance of one item's difference when the two accuracies are equal), for ratio metrics the
    per-document variance of the linearised log ratio (n * se^2). None when distance is 0: no
    suite size can establish a change beyond a threshold the true effect sits on.
    """
    if not distance > 0:
        return None
    return int(math.ceil((z_quantile(level) + float(special.ndtri(power))) ** 2 * dispersion / distance**2))


def power_at(distance: float, se: float, level: float) -> float:
    """P(a one-sided level test passes) when the true effect lies ``distance`` beyond the threshold:
    Phi(distance / se - z_{1-level}) (normal approximation; 1 or 0 when se is 0)."""
    if se <= 0:
        return 1.0 if distance > 0 else 0.0
    return float(special.ndtr(distance / se - z_quantile(level)))


def clopper_pearson(successes: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided exact bounds (each at level alpha) of a binomial proportion (Clopper & Pearson 1934)."""
    low = 0.0 if successes == 0 else float(sps.beta.ppf(alpha, successes, n - successes + 1))
    high = 1.0 if successes == n else float(sps.beta.ppf(1 - alpha, successes + 1, n - successes))
    return low, high


def ratio_value(numerators, weights, transform: str) -> float:
    """value = f(sum numerators / sum weights): corpus perplexity (exp), bits per byte, or a mean."""
    return float(_TRANSFORMS[transform](np.sum(numerators) / np.sum(weights)))


_DERIVATIVES = {
    "exp": np.exp,
    "bits": lambda u: 1.0 / math.log(2),
    "identity": lambda u: 1.0,
    "binary": lambda u: 1.0,
}
"""f' of each transform (the delta method's derivative)."""

_TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "exp": np.exp,
    "bits": lambda u: u / math.log(2),
    "identity": lambda u: u,
    "binary": lambda u: u,  # the mean of 0/1 values: accuracy
}
