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
H0: effect >= t against H1: effect < t. Bounds are one-sided at level alpha each, so
[low, high] is a (1 - 2 alpha) two-sided interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

DEFAULT_ITERATIONS = 10_000
POWER = 0.8
_CHUNK = 1_000


@dataclass(frozen=True)
class Estimate:
    """A paired comparison of one metric: point estimate, one-sided bounds and what is needed to test."""

    base: float
    """The base's value of the metric on these items."""
    value: float
    """The checkpoint's value on the same items."""
    effect: float
    """value / base - 1 (relative) or value - base (absolute)."""
    low: float
    """One-sided lower confidence bound of the effect at level alpha."""
    high: float
    """One-sided upper confidence bound of the effect at level alpha."""
    se: float
    """Standard error of the effect (bootstrap standard deviation, or the analytic paired one)."""
    n: int
    """Number of paired items."""
    method: str
    """``bootstrap`` or ``mcnemar``."""
    mcnemar_p: float | None = None
    """McNemar's exact two-sided p-value of 'no difference' (binary metrics only)."""


class PairedBootstrap:
    """Percentile bootstrap over items of a ratio-of-sums metric, base and checkpoint resampled together.

    Each item i carries a base numerator b_i, a checkpoint numerator c_i and a denominator w_i
    (the same for both: token, byte or word counts, or 1 for plain means). The metric is

        value(x) = f( sum_i x_i / sum_i w_i )

    with f = exp for perplexity (x = nll, w = tokens: exp of the token-weighted mean NLL, never an
    average of per-document perplexities), f(u) = u / ln 2 for bits per byte (w = bytes), and the
    identity for means (w = 1). One replicate draws n items with replacement (multinomial counts
    k_i) and recomputes both values from the same draw: value*(x) = f(sum k_i x_i / sum k_i w_i).
    Bounds are percentiles of effect*; p-values are the bootstrap tail fractions
    p_above(t) = (1 + #{effect* <= t}) / (B + 1) (Efron & Tibshirani 1993, ch. 13 and 16).
    """

    def __init__(self, base, checkpoint, weights, transform: str, relative: bool, rng, iterations=DEFAULT_ITERATIONS):
        base, checkpoint, weights = (np.asarray(a, dtype=float) for a in (base, checkpoint, weights))
        if not (len(base) == len(checkpoint) == len(weights)) or len(base) == 0:
            raise ValueError("paired bootstrap needs equally long, non-empty base/checkpoint/weight arrays")
        self.n = len(base)
        self.relative = relative
        self._f = _TRANSFORMS[transform]
        self.base_value = ratio_value(base, weights, transform)
        self.value = ratio_value(checkpoint, weights, transform)
        self.effect = self._effect(self.base_value, self.value)
        draws = []
        for start in range(0, iterations, _CHUNK):
            k = rng.multinomial(self.n, np.full(self.n, 1.0 / self.n), size=min(_CHUNK, iterations - start))
            w = k @ weights
            draws.append(self._effect(self._f((k @ base) / w), self._f((k @ checkpoint) / w)))
        self.replicates = np.concatenate(draws)

    def _effect(self, base, value):
        return value / base - 1.0 if self.relative else value - base

    def p_above(self, t: float) -> float:
        """p-value of H0: effect <= t (small when the effect is clearly above t)."""
        return (1 + int(np.sum(self.replicates <= t))) / (len(self.replicates) + 1)

    def p_below(self, t: float) -> float:
        """p-value of H0: effect >= t (small when the effect is clearly below t)."""
        return (1 + int(np.sum(self.replicates >= t))) / (len(self.replicates) + 1)

    def estimate(self, alpha: float) -> Estimate:
        low, high = np.quantile(self.replicates, [alpha, 1 - alpha])
        return Estimate(
            base=float(self.base_value),
            value=float(self.value),
            effect=float(self.effect),
            low=float(low),
            high=float(high),
            se=float(np.std(self.replicates, ddof=1)),
            n=self.n,
            method="bootstrap",
        )


class PairedBinary:
    """Paired 0/1 outcomes (acc, exact_match): McNemar's exact test and an exact conditional bound.

    With n items, n01 items wrong for the base and right for the checkpoint, n10 the reverse and
    m = n01 + n10 discordant, the accuracy difference is d = (n01 - n10) / n. Conditional on m,
    n01 ~ Binomial(m, theta) and d = (m / n)(2 theta - 1), so a threshold t on d is the threshold
    theta_0(t) = 1/2 + t n / (2 m) on theta and every test is an exact binomial test:

        p_above(t) = P(X >= n01 | X ~ Bin(m, theta_0(t)))      (H0: d <= t)
        p_below(t) = P(X <= n01 | X ~ Bin(m, theta_0(t)))      (H0: d >= t)

    Bounds invert them: Clopper-Pearson bounds of theta mapped to d (no normal approximation,
    valid at any n). McNemar's exact p-value is the two-sided binomial test of theta = 1/2
    (McNemar 1947; Dietterich 1998, "Approximate Statistical Tests for Comparing Supervised
    Classification Learning Algorithms"). Relative effects divide by the base accuracy.
    Conditioning on m treats the discordance rate as known (m / n), the usual exact-conditional
    approach; the simulation tests check the error rates this gives.
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
        self.m = self.n01 + self.n10
        self.base_value = float(base.mean())
        self.value = float(checkpoint.mean())
        self.relative = relative
        self._scale = self.base_value if relative else 1.0
        self.effect = ((self.n01 - self.n10) / self.n) / self._scale if self._scale else math.inf

    def _theta0(self, t: float) -> float:
        return 0.5 + (t * self._scale) * self.n / (2 * self.m)

    def p_above(self, t: float) -> float:
        """p-value of H0: effect <= t."""
        if self.m == 0:
            return 0.0 if t < 0 else 1.0  # no discordant item: the difference is exactly 0
        theta = self._theta0(t)
        if theta <= 0:
            return 0.0 if self.n01 > 0 or theta < 0 else 1.0
        if theta >= 1:
            return 1.0
        return float(sps.binom.sf(self.n01 - 1, self.m, theta))

    def p_below(self, t: float) -> float:
        """p-value of H0: effect >= t."""
        if self.m == 0:
            return 0.0 if t > 0 else 1.0
        theta = self._theta0(t)
        if theta >= 1:
            return 0.0 if self.n01 < self.m or theta > 1 else 1.0
        if theta <= 0:
            return 1.0
        return float(sps.binom.cdf(self.n01, self.m, theta))

    def estimate(self, alpha: float) -> Estimate:
        if self.m == 0:
            low = high = 0.0
            mcnemar = 1.0
        else:
            theta_low = 0.0 if self.n01 == 0 else sps.beta.ppf(alpha, self.n01, self.n10 + 1)
            theta_high = 1.0 if self.n10 == 0 else sps.beta.ppf(1 - alpha, self.n01 + 1, self.n10)
            low, high = ((self.m / self.n) * (2 * th - 1) / self._scale for th in (theta_low, theta_high))
            mcnemar = float(sps.binomtest(self.n01, self.m, 0.5).pvalue)
        d = (self.n01 - self.n10) / self.n
        # Var(d) = (p01 + p10 - (p01 - p10)^2) / n, with the observed proportions plugged in.
        se = math.sqrt(max(self.m / self.n - d * d, 0.0) / self.n) / self._scale
        return Estimate(
            base=self.base_value,
            value=self.value,
            effect=float(self.effect),
            low=float(low),
            high=float(high),
            se=float(se),
            n=self.n,
            method="mcnemar",
            mcnemar_p=mcnemar,
        )


class BinomialValue:
    """One 0/1 metric's own value against a fixed limit (floors): exact binomial tests.

    With k successes in n items: p_above(t) = P(X >= k | Bin(n, t)) (H0: accuracy <= t),
    p_below(t) = P(X <= k | Bin(n, t)); bounds are Clopper-Pearson's.
    """

    def __init__(self, values):
        values = np.asarray(values, dtype=float)
        self.n = len(values)
        self.k = int(values.sum())

    def p_above(self, t: float) -> float:
        return 1.0 if t >= 1 else (0.0 if t < 0 else float(sps.binom.sf(self.k - 1, self.n, t)))

    def p_below(self, t: float) -> float:
        return 1.0 if t <= 0 else (0.0 if t > 1 else float(sps.binom.cdf(self.k, self.n, t)))

    def estimate(self, alpha: float) -> Estimate:
        low, high = clopper_pearson(self.k, self.n, alpha)
        value = self.k / self.n
        return Estimate(math.nan, value, value, low, high, math.sqrt(value * (1 - value) / self.n), self.n, "binomial")


class ValueBootstrap:
    """One ratio-of-sums metric's own value against a fixed limit (floors): percentile bootstrap.

    Implemented as a PairedBootstrap against a constant base whose numerators are 0, so that
    effect* = value* - f(0); thresholds and bounds are shifted back by f(0).
    """

    def __init__(self, values, weights, transform: str, rng, iterations=DEFAULT_ITERATIONS):
        self._paired = PairedBootstrap(np.zeros(len(values)), values, weights, transform, False, rng, iterations)
        self._shift = float(_TRANSFORMS[transform](0.0))

    def p_above(self, t: float) -> float:
        return self._paired.p_above(t - self._shift)

    def p_below(self, t: float) -> float:
        return self._paired.p_below(t - self._shift)

    def estimate(self, alpha: float) -> Estimate:
        e = self._paired.estimate(alpha)
        return Estimate(math.nan, e.value, e.value, e.low + self._shift, e.high + self._shift, e.se, e.n, "bootstrap")


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


def minimum_detectable_effect(se: float, alpha: float, n: int, binary: bool, scale: float = 1.0) -> float:
    """Smallest true effect a one-sided level-alpha test detects with 80% power.

    MDE = (z_{1-alpha} + z_{0.8}) * se (normal planning approximation; Miller 2024, section 5).
    For 0/1 metrics it is at least 1/n (scaled): no change smaller than one item can be seen.
    """
    mde = (sps.norm.ppf(1 - alpha) + sps.norm.ppf(POWER)) * se
    if binary:
        mde = max(mde, 1.0 / n / scale)
    return float(mde)


def clopper_pearson(successes: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided exact bounds (each at level alpha) of a binomial proportion (Clopper & Pearson 1934)."""
    low = 0.0 if successes == 0 else float(sps.beta.ppf(alpha, successes, n - successes + 1))
    high = 1.0 if successes == n else float(sps.beta.ppf(1 - alpha, successes + 1, n - successes))
    return low, high


def ratio_value(numerators, weights, transform: str) -> float:
    """value = f(sum numerators / sum weights): corpus perplexity (exp), bits per byte, or a mean."""
    return float(_TRANSFORMS[transform](np.sum(numerators) / np.sum(weights)))


_TRANSFORMS = {
    "exp": np.exp,
    "bits": lambda u: u / math.log(2),
    "identity": lambda u: u,
    "binary": lambda u: u,  # the mean of 0/1 values: accuracy
}
