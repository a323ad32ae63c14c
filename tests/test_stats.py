"""Paired statistics on hand-worked cases, and the 0/1 tests' exact size by enumerating every outcome."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import gammaln

from gate.stats import (
    BinomialValue,
    PairedBinary,
    PairedBootstrap,
    ValueBootstrap,
    binary_p_values,
    clopper_pearson,
    holm,
    holm_levels,
    items_needed,
    minimum_detectable_effect,
    power_at,
    score_statistic,
    tango_statistic,
)

Z95, Z80 = 1.6448536269514722, 0.8416212335729143


def binary_pairs(n01: int, n10: int, both_right: int, both_wrong: int):
    base = [0] * n01 + [1] * n10 + [1] * both_right + [0] * both_wrong
    ckpt = [1] * n01 + [0] * n10 + [1] * both_right + [0] * both_wrong
    return np.array(base), np.array(ckpt)


def tango_z(b, c, n, d0, correction=0.0):
    """Tango (1998), eq. 4-6, written out independently: b gains, c losses, H0: p_b - p_c = d0."""
    A = 2 * n
    B = -b - c + (2 * n - b + c) * d0
    C = -c * d0 * (1 - d0)
    p_c = (-B + math.sqrt(B * B - 4 * A * C)) / (2 * A)
    return (b - c - n * d0 - correction) / math.sqrt(n * (2 * p_c + d0 - d0 * d0))


def test_mcnemar_at_margin_zero_by_hand():
    base, ckpt = binary_pairs(n01=8, n10=1, both_right=6, both_wrong=5)  # n = 20, m = 9
    test = PairedBinary(base, ckpt)
    est = test.estimate(0.05, threshold=0.0)
    assert est.effect == pytest.approx(7 / 20) and est.method == "mcnemar"
    assert (est.base, est.value) == (pytest.approx(7 / 20), pytest.approx(14 / 20))
    assert est.mcnemar_p == pytest.approx(2 * (1 + 9) / 512)  # 2 P(X <= 1), X ~ Bin(9, 1/2)
    assert test.p_above(0.0) == pytest.approx(10 / 512)  # P(X >= 8)
    assert test.p_below(0.0) == pytest.approx(1 - 1 / 512)  # P(X <= 8)
    theta_low, theta_high = sps.beta.ppf(0.05, 8, 2), sps.beta.ppf(0.95, 9, 1)  # Clopper-Pearson
    assert est.low == pytest.approx(9 / 20 * (2 * theta_low - 1))
    assert est.high == pytest.approx(9 / 20 * (2 * theta_high - 1))
    assert est.se == pytest.approx(math.sqrt((9 / 20 - 0.35**2) / 20))


def test_score_test_by_hand():
    """9 losses, 3 gains in 200 items, margin 0.05: Tango's z with the 1/2 continuity correction."""
    test = PairedBinary(*binary_pairs(n01=3, n10=9, both_right=150, both_wrong=38))
    z = tango_z(3, 9, 200, -0.05, correction=0.5)
    assert test.p_above(-0.05) == pytest.approx(sps.norm.sf(z), rel=1e-9)
    assert test.p_below(-0.05) == pytest.approx(sps.norm.cdf(tango_z(3, 9, 200, -0.05, correction=-0.5)), rel=1e-9)
    assert test.estimate(0.05, threshold=-0.05).method == "score"


def test_score_statistic_reproduces_tango_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(5, 400))
        cells = rng.multinomial(n, rng.dirichlet(np.full(4, 0.5)))  # n11, n10, n01, n00
        t = float(rng.uniform(-0.6, 0.6))
        up, _ = score_statistic(cells, [-t, -1 - t, 1 - t, -t], correction=0.0)
        expected = tango_z(cells[2], cells[1], n, t)
        assert up == pytest.approx(expected, rel=1e-7, abs=1e-7)
        closed, _ = tango_statistic(cells, t, correction=0.0)  # the closed form gate uses for absolute margins
        assert closed == pytest.approx(expected, rel=1e-9, abs=1e-9)
    zero = np.array([150.0, 0.0, 0.0, 50.0])  # no discordant item: the restricted MLE sits on the boundary
    assert score_statistic(zero, [0.05, -0.95, 1.05, 0.05])[0] == pytest.approx(tango_statistic(zero, -0.05)[0])


def test_no_discordant_item_never_gives_p_zero():
    """Defect: 9 losses, 0 gains in 200 items passed max_drop 0.05 with p = 0; no discordance gave p = 0."""
    losses = PairedBinary(*binary_pairs(n01=0, n10=9, both_right=150, both_wrong=41))
    assert losses.p_above(-0.05) > 0.05  # the drop of 0.045 may well be 0.05 or more
    same = PairedBinary(*binary_pairs(0, 0, 150, 50))
    p = same.p_above(-0.05)
    # Restricted MLE: all the drop in the 10 cell (p10 = 0.05); z = (10 - 1/2) / sqrt(200 * 0.05 * 0.95).
    assert p == pytest.approx(sps.norm.sf(9.5 / math.sqrt(200 * 0.05 * 0.95)))
    assert 0 < p < 0.05
    small = PairedBinary(*binary_pairs(0, 0, 15, 5))
    assert small.p_above(-0.05) > 0.05  # 20 identical items cannot rule out a 5-point drop
    assert same.p_above(0.0) == 1.0 and same.p_below(0.0) == 1.0  # McNemar with m = 0
    assert same.estimate(0.05, -0.05).se == pytest.approx(math.sqrt(1 / 200 / 200))  # plans with one discordant item, never se = 0


def test_bounds_invert_the_tests():
    """A bound lies inside a threshold exactly when the test at that threshold rejects at the level."""
    for relative in (False, True):
        test = PairedBinary(*binary_pairs(30, 12, 100, 58), relative=relative)
        for level in (0.05, 0.005):
            est = test.estimate(level, threshold=-0.02)
            assert test.p_above(est.low) == pytest.approx(level, rel=1e-4)
            assert test.p_below(est.high) == pytest.approx(level, rel=1e-4)
            assert test.p_above(est.low - 1e-3) < level < test.p_above(est.low + 1e-3)
            assert test.p_below(est.high + 1e-3) < level < test.p_below(est.high - 1e-3)


def test_relative_binary_effect_divides_by_the_base_accuracy():
    test = PairedBinary(*binary_pairs(2, 6, 12, 0), relative=True)  # base acc 18/20, ckpt 14/20
    assert test.estimate(0.05, -0.1).effect == pytest.approx((14 / 20) / (18 / 20) - 1)
    with pytest.raises(ValueError):
        PairedBinary([0, 0, 0], [0, 1, 0], relative=True)  # base accuracy 0: no relative change


def _trinomial_tables(n, p01, p10, tail=1e-12):
    """Every (n01, n10) with non-negligible probability, and its probability."""
    top01 = int(sps.binom.isf(tail, n, p01)) + 1 if p01 > 0 else 0
    top10 = int(sps.binom.isf(tail, n, p10)) + 1
    b, c = np.meshgrid(np.arange(min(top01, n) + 1), np.arange(min(top10, n) + 1), indexing="ij")
    b, c = b[b + c <= n].astype(float), c[b + c <= n].astype(float)
    rest = n - b - c
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = (
            gammaln(n + 1) - gammaln(b + 1) - gammaln(c + 1) - gammaln(rest + 1)
            + np.where(b > 0, b * np.log(max(p01, 1e-300)), 0.0) + c * np.log(p10) + rest * np.log1p(-(p01 + p10))
        )
    prob = np.where((b > 0) & (p01 == 0), 0.0, np.exp(log_p))
    counts = np.stack([rest, c, b, np.zeros_like(b)], axis=-1)  # the 11/00 split does not matter here
    return counts, prob


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_exact_size_of_the_0_1_guardrail(alpha):
    """P(pass) at a true drop equal to the margin, summed over every outcome: at most alpha.

    The grid includes a margin equal to the discordance (p01 = 0: no item can improve), small n,
    and margin 0 (McNemar); the old conditional rule passed 7-48% of the time on it.
    """
    worst = 0.0
    for n in (10, 30, 100, 200, 1000):
        for psi in (0.02, 0.1, 0.15, 0.3, 0.6):
            for margin in (0.0, 0.01, 0.05, 0.1, psi):
                if margin > psi:
                    continue
                counts, prob = _trinomial_tables(n, (psi - margin) / 2, (psi + margin) / 2)
                assert prob.sum() == pytest.approx(1.0, abs=1e-6)
                passes = binary_p_values(counts, -margin, relative=False)[0] <= alpha
                worst = max(worst, float(prob[passes].sum()))
    # Documented (README, gate.stats): at most 1.03 alpha (0.0502 at alpha = 0.05), also at Holm's smaller levels.
    assert worst <= alpha * 1.03, worst
    assert worst > alpha * 0.8  # and not needlessly conservative


def test_exact_size_of_the_relative_0_1_guardrail():
    """Relative margin (acc_c / acc_b - 1 >= -margin): every 4-cell table of n items enumerated."""
    for n in (15, 40):
        tables = np.array([(a, b, c, n - a - b - c) for a in range(n + 1) for b in range(n + 1 - a) for c in range(n + 1 - a - b)], dtype=float)
        log_fact = gammaln(n + 1) - gammaln(tables + 1).sum(1)
        for p11, p10, p01, margin in ((0.6, 0.1, 0.03, 0.1), (0.4, 0.1, 0.0, 0.2), (0.2, 0.3, 0.2, 0.2)):
            p = np.array([p11, p10, p01, 1 - p11 - p10 - p01])
            assert p11 + p01 == pytest.approx((1 - margin) * (p11 + p10))  # exactly at the margin
            with np.errstate(divide="ignore", invalid="ignore"):
                log_p = log_fact + np.where(tables > 0, tables * np.log(np.where(p > 0, p, 1)), 0).sum(1)
            prob = np.where(((tables > 0) & (p == 0)).any(1), 0.0, np.exp(log_p))
            usable = tables[:, 0] + tables[:, 1] > 0  # base accuracy 0 is refused (inconclusive)
            passes = usable & (binary_p_values(tables, -margin, relative=True)[0] <= 0.05)
            assert prob[passes].sum() <= 0.05


def test_score_test_power_matches_the_planning_formula():
    """At n = items_needed, the exact chance to pass a no-change checkpoint is about 80%.

    (At a few hundred items the continuity correction costs a few points of power: 74% at n = 248.)"""
    psi, margin = 0.1, 0.02
    n = items_needed(psi, margin, 0.05)
    assert n == math.ceil((Z95 + Z80) ** 2 * psi / margin**2)
    counts, prob = _trinomial_tables(n, psi / 2, psi / 2)
    power = prob[binary_p_values(counts, -margin, relative=False)[0] <= 0.05].sum()
    assert power == pytest.approx(0.8, abs=0.05)


def test_bootstrap_point_estimate_is_the_corpus_perplexity_ratio():
    rng = np.random.default_rng(0)
    test = PairedBootstrap([2.0, 4.0, 3.0], [3.0, 5.0, 3.5], [2, 2, 2], "exp", relative=True, rng=rng, iterations=200)
    est = test.estimate(0.05)
    assert est.base == pytest.approx(math.exp(9 / 6)) and est.value == pytest.approx(math.exp(11.5 / 6))
    assert est.effect == pytest.approx(math.exp(2.5 / 6) - 1)
    assert test.theta == pytest.approx(2.5 / 6)  # the log ratio
    absolute = PairedBootstrap([2.0, 4.0], [3.0, 5.0], [2, 2], "exp", relative=False, rng=rng, iterations=200)
    assert absolute.effect == pytest.approx(math.exp(2) - math.exp(1.5))
    bits = PairedBootstrap([2.0, 4.0], [3.0, 5.0], [10, 10], "bits", relative=False, rng=rng, iterations=200)
    assert bits.value == pytest.approx(8 / 20 / math.log(2))


def test_bootstrap_standard_error_is_the_ratio_estimators():
    """se of the log perplexity ratio: the linearised ratio estimator, computed here by hand."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(5, 50, 40).astype(float)
    base = tokens * rng.normal(2.0, 0.2, 40)
    ckpt = base + tokens * rng.normal(0.01, 0.05, 40)
    test = PairedBootstrap(base, ckpt, tokens, "exp", True, rng, iterations=100)
    y = ckpt - base
    r = y.sum() / tokens.sum()
    se = math.sqrt(((y - r * tokens) ** 2).sum() * 40 / 39) / tokens.sum()
    assert test.se == pytest.approx(se)


def test_bootstrap_bounds_invert_its_p_values():
    rng = np.random.default_rng(2)
    tokens = rng.integers(20, 200, 300).astype(float)
    base = tokens * rng.normal(2.0, 0.3, 300)
    ckpt = base + tokens * rng.normal(0.02, 0.05, 300)
    test = PairedBootstrap(base, ckpt, tokens, "exp", True, rng, iterations=1999)
    for level in (0.05, 0.01):
        est = test.estimate(level)
        assert est.low < est.effect < est.high
        assert test.p_above(est.low - 1e-9) <= level < test.p_above(est.low + 1e-9)
        assert test.p_below(est.high + 1e-9) <= level < test.p_below(est.high - 1e-9)


def test_bootstrap_bounds_shrink_with_n():
    rng = np.random.default_rng(2)
    widths = []
    for n in (50, 800):
        tokens = rng.integers(20, 200, n).astype(float)
        base = tokens * rng.normal(2.0, 0.3, n)
        ckpt = base + tokens * rng.normal(0.02, 0.05, n)
        est = PairedBootstrap(base, ckpt, tokens, "exp", True, rng, iterations=2000).estimate(0.05)
        widths.append(est.high - est.low)
    assert widths[1] < widths[0] / 2.5  # width ~ 1/sqrt(n): 16x the items, about 4x narrower


def test_degenerate_bootstrap_is_flagged_and_certifies_nothing():
    """Defect: one document, or every document shifted alike, gave a zero-width interval and p = 1/(B+1)."""
    rng = np.random.default_rng(1)
    one = PairedBootstrap([100.0], [100.0 + 50 * math.log(1.049)], [50], "exp", True, rng, iterations=500)
    tokens = rng.integers(20, 100, 200).astype(float)
    base = tokens * 2.5
    alike = PairedBootstrap(base, base + tokens * math.log(1.01), tokens, "exp", True, rng, iterations=500)
    same = PairedBootstrap(base, base.copy(), tokens, "exp", True, rng, iterations=500)
    for test in (one, alike, same):
        est = test.estimate(0.05)
        assert est.degenerate and est.low is None and est.high is None
        assert test.p_below(0.05) == 1.0 and test.p_above(-0.05) == 1.0


def test_bootstrap_is_reproducible_from_the_seed():
    args = (np.arange(10.0), np.arange(10.0) * 1.1 + np.sin(np.arange(10.0)), np.ones(10), "identity", False)
    a = PairedBootstrap(*args, rng=np.random.default_rng(7), iterations=300).t_stats
    b = PairedBootstrap(*args, rng=np.random.default_rng(7), iterations=300).t_stats
    assert np.array_equal(a, b)


def test_cluster_bootstrap_resamples_clusters():
    """Clustered items: the ratio is unchanged, the se is the cluster totals' (wider when clusters share shifts)."""
    rng = np.random.default_rng(4)
    clusters = np.repeat(np.arange(40), 5)
    shift = rng.normal(0, 0.05, 40)[clusters] + rng.normal(0, 0.01, 200)  # a shared shift per passage
    tokens = np.full(200, 30.0)
    base = tokens * 2.0
    ckpt = base + tokens * shift
    flat = PairedBootstrap(base, ckpt, tokens, "exp", True, rng, iterations=300)
    grouped = PairedBootstrap(base, ckpt, tokens, "exp", True, rng, iterations=300, clusters=clusters)
    assert grouped.effect == pytest.approx(flat.effect) and grouped.units == 40
    sums = [(ckpt[clusters == k] - base[clusters == k]).sum() for k in range(40)]
    r = (ckpt - base).sum() / tokens.sum()
    se = math.sqrt(sum((s - r * 150.0) ** 2 for s in sums) * 40 / 39) / tokens.sum()
    assert grouped.se == pytest.approx(se)
    assert grouped.se > 1.8 * flat.se


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5]
    assert holm([0.4, 0.4, 0.4]) == pytest.approx([1.0, 1.0, 1.0])


def test_holm_levels_by_hand_and_agree_with_adjusted_p():
    # Sorted: 0.005 (at 0.05/4), 0.01 (0.05/3), 0.03 > 0.05/2 stops; the rest keep 0.025.
    assert holm_levels([0.01, 0.04, 0.03, 0.005], 0.05) == pytest.approx([0.05 / 3, 0.025, 0.025, 0.0125])
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = list(rng.uniform(0, 0.08, int(rng.integers(1, 9))) ** 2 * 10)
        levels, adjusted = holm_levels(p, 0.05), holm(p)
        assert [pi <= lv for pi, lv in zip(p, levels)] == [a <= 0.05 for a in adjusted]


def test_sizing_formulas():
    assert minimum_detectable_effect(0.1, 0.05) == pytest.approx((Z95 + Z80) * 0.1)
    level = 0.05 / 10
    assert minimum_detectable_effect(0.1, level) == pytest.approx((sps.norm.isf(level) + Z80) * 0.1)
    assert items_needed(0.1, 0.02, 0.05) == math.ceil((Z95 + Z80) ** 2 * 0.1 / 0.02**2)
    assert items_needed(0.1, 0.0, 0.05) is None
    assert power_at((Z95 + Z80) * 0.1, 0.1, 0.05) == pytest.approx(0.8)


def test_binomial_value_for_floors():
    value = BinomialValue([1] * 7 + [0] * 3)
    assert value.p_above(0.5) == pytest.approx(sps.binom.sf(6, 10, 0.5))  # P(X >= 7), X ~ Bin(10, 1/2)
    assert value.p_below(0.9) == pytest.approx(sps.binom.cdf(7, 10, 0.9))
    assert value.estimate(0.05).low == pytest.approx(clopper_pearson(7, 10, 0.05)[0]) == pytest.approx(sps.beta.ppf(0.05, 7, 4))


def test_value_bootstrap_for_floors():
    rng = np.random.default_rng(0)
    nll = rng.normal(2.0, 0.2, 100) * 10
    test = ValueBootstrap(nll, np.full(100, 10.0), "exp", rng, iterations=999)
    est = test.estimate(0.05)
    assert est.value == pytest.approx(math.exp(nll.sum() / 1000))
    assert est.low < est.value < est.high
    assert test.p_below(est.high + 1e-9) <= 0.05 < test.p_below(est.high - 1e-9)
    constant = ValueBootstrap([2.0, 2.0, 2.0], [1, 1, 1], "exp", rng, iterations=100)
    assert constant.estimate(0.05).degenerate and constant.p_below(math.exp(2) + 0.1) == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError):
        PairedBinary([1, 0], [1])
    with pytest.raises(ValueError):
        PairedBinary([0.5], [1])
    with pytest.raises(ValueError):
        PairedBootstrap([], [], [], "exp", True, np.random.default_rng(0))
