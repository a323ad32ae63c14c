"""Paired statistics on hand-worked cases (values by hand or from scipy's distributions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from gate.stats import BinomialValue, PairedBinary, PairedBootstrap, ValueBootstrap, clopper_pearson, holm, minimum_detectable_effect


def binary_pairs(n01: int, n10: int, both_right: int, both_wrong: int):
    base = [0] * n01 + [1] * n10 + [1] * both_right + [0] * both_wrong
    ckpt = [1] * n01 + [0] * n10 + [1] * both_right + [0] * both_wrong
    return np.array(base), np.array(ckpt)


def test_mcnemar_and_exact_bounds_by_hand():
    base, ckpt = binary_pairs(n01=8, n10=1, both_right=6, both_wrong=5)  # n = 20, m = 9
    test = PairedBinary(base, ckpt)
    est = test.estimate(alpha=0.05)
    assert est.effect == pytest.approx(7 / 20)
    assert (est.base, est.value) == (pytest.approx(7 / 20), pytest.approx(14 / 20))
    assert est.mcnemar_p == pytest.approx(2 * (1 + 9) / 512)  # 2 P(X <= 1), X ~ Bin(9, 1/2)
    assert test.p_above(0.0) == pytest.approx(10 / 512)  # P(X >= 8)
    theta = 0.5 - 0.1 * 20 / (2 * 9)  # threshold d = -0.1 on theta
    assert test.p_above(-0.1) == pytest.approx(9 * theta**8 * (1 - theta) + theta**9)
    assert test.p_below(0.0) == pytest.approx(1 - 1 / 512)  # P(X <= 8)
    theta_low = sps.beta.ppf(0.05, 8, 2)  # Clopper-Pearson
    theta_high = sps.beta.ppf(0.95, 9, 1)
    assert est.low == pytest.approx(9 / 20 * (2 * theta_low - 1))
    assert est.high == pytest.approx(9 / 20 * (2 * theta_high - 1))
    assert est.se == pytest.approx(math.sqrt((9 / 20 - 0.35**2) / 20))


def test_bound_and_test_agree():
    """The one-sided lower bound is the threshold at which the exact test's p-value equals alpha."""
    test = PairedBinary(*binary_pairs(30, 12, 100, 58))
    low = test.estimate(0.05).low
    assert test.p_above(low) == pytest.approx(0.05, rel=1e-6)
    assert test.p_above(low - 0.01) < 0.05 < test.p_above(low + 0.01)


def test_no_discordant_items_means_no_difference():
    base = np.array([1, 0, 1, 1])
    test = PairedBinary(base, base.copy())
    est = test.estimate(0.05)
    assert (est.effect, est.low, est.high, est.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)
    assert test.p_above(-0.02) == 0.0 and test.p_above(0.0) == 1.0
    assert test.p_below(0.02) == 0.0 and test.p_below(0.0) == 1.0


def test_relative_binary_effect_divides_by_the_base_accuracy():
    test = PairedBinary(*binary_pairs(2, 6, 12, 0), relative=True)  # base acc 18/20, ckpt 14/20
    assert test.estimate(0.05).effect == pytest.approx((14 / 20) / (18 / 20) - 1)


def test_bootstrap_point_estimate_is_the_corpus_perplexity_ratio():
    rng = np.random.default_rng(0)
    test = PairedBootstrap([2.0, 4.0], [3.0, 5.0], [2, 2], "exp", relative=True, rng=rng, iterations=200)
    est = test.estimate(0.05)
    assert est.base == pytest.approx(math.exp(6 / 4)) and est.value == pytest.approx(math.exp(8 / 4))
    assert est.effect == pytest.approx(math.exp(0.5) - 1)
    absolute = PairedBootstrap([2.0, 4.0], [3.0, 5.0], [2, 2], "exp", relative=False, rng=rng, iterations=200)
    assert absolute.effect == pytest.approx(math.exp(2) - math.exp(1.5))
    bits = PairedBootstrap([2.0, 4.0], [3.0, 5.0], [10, 10], "bits", relative=False, rng=rng, iterations=200)
    assert bits.value == pytest.approx(8 / 20 / math.log(2))


def test_bootstrap_of_identical_models_is_exactly_zero():
    base = np.arange(1.0, 51.0)
    test = PairedBootstrap(base, base.copy(), np.full(50, 10.0), "exp", True, np.random.default_rng(1), iterations=500)
    assert np.all(test.replicates == 0)
    assert test.p_below(0.02) == pytest.approx(1 / 501)  # "effect >= 2%" is rejected as far as B allows
    assert test.p_above(0.0) == 1.0


def test_bootstrap_bounds_contain_the_estimate_and_shrink_with_n():
    rng = np.random.default_rng(2)
    widths = []
    for n in (50, 800):
        tokens = rng.integers(20, 200, n).astype(float)
        base = tokens * rng.normal(2.0, 0.3, n)
        ckpt = base + tokens * rng.normal(0.02, 0.05, n)
        est = PairedBootstrap(base, ckpt, tokens, "exp", True, rng, iterations=2000).estimate(0.05)
        assert est.low < est.effect < est.high
        widths.append(est.high - est.low)
    assert widths[1] < widths[0] / 2.5  # width ~ 1/sqrt(n): 16x the items, about 4x narrower


def test_bootstrap_is_reproducible_from_the_seed():
    args = (np.arange(10.0), np.arange(10.0) * 1.1, np.ones(10), "identity", False)
    a = PairedBootstrap(*args, rng=np.random.default_rng(7), iterations=300).replicates
    b = PairedBootstrap(*args, rng=np.random.default_rng(7), iterations=300).replicates
    assert np.array_equal(a, b)


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5]
    assert holm([0.4, 0.4, 0.4]) == pytest.approx([1.0, 1.0, 1.0])


def test_minimum_detectable_effect():
    assert minimum_detectable_effect(0.1, 0.05, 100, binary=False) == pytest.approx((1.6448536 + 0.8416212) * 0.1)
    assert minimum_detectable_effect(0.0, 0.05, 50, binary=True) == pytest.approx(1 / 50)


def test_binomial_value_for_floors():
    value = BinomialValue([1] * 7 + [0] * 3)
    assert value.p_above(0.5) == pytest.approx(176 / 1024)  # P(X >= 7), X ~ Bin(10, 1/2)
    assert value.p_below(0.9) == pytest.approx(sps.binom.cdf(7, 10, 0.9))
    assert value.estimate(0.05).low == pytest.approx(clopper_pearson(7, 10, 0.05)[0]) == pytest.approx(sps.beta.ppf(0.05, 7, 4))


def test_value_bootstrap_for_floors():
    test = ValueBootstrap([2.0, 2.0, 2.0], [1, 1, 1], "exp", np.random.default_rng(0), iterations=100)
    est = test.estimate(0.05)
    assert est.value == pytest.approx(math.exp(2)) and est.low == pytest.approx(math.exp(2))
    assert test.p_below(math.exp(2) + 0.1) == pytest.approx(1 / 101)  # "value >= e^2 + 0.1" rejected


def test_bad_inputs():
    with pytest.raises(ValueError):
        PairedBinary([1, 0], [1])
    with pytest.raises(ValueError):
        PairedBinary([0.5], [1])
    with pytest.raises(ValueError):
        PairedBootstrap([], [], [], "exp", True, np.random.default_rng(0))
