"""glore_jax.recipe.stats against hand-computed values (no JAX needed)."""

import math

import pytest

import numpy as np

from glore_jax.recipe.stats import (_average_ranks, auroc, balanced_accuracy, cluster_bootstrap, mcnemar_exact,
                                    mean_ci, paired_summary, wilson_interval)

T, F = True, False


def _pairs(b01: int, b10: int, concordant: int = 0):
    """a, b with b01 (a wrong, b right), b10 (a right, b wrong) and some concordant pairs."""
    a = [F] * b01 + [T] * b10 + [T, F] * concordant
    b = [T] * b01 + [F] * b10 + [T, F] * concordant
    return a, b


# z^2 = 3.8415, 1 + z^2/n = 1.38415 for n = 10 throughout.
@pytest.mark.parametrize("k,n,expected", [
    # p=.8: center=(.8+.19207)/1.38415=.71674; half=(1.96/1.38415)*sqrt(.016+.0096037)=1.41600*.160012=.22658
    (8, 10, (0.4902, 0.9433)),
    # p=0: center=.19207/1.38415=.13877; half=1.41600*sqrt(.0096037)=.13877 -> lo=0, hi=.27753
    (0, 10, (0.0, 0.2775)),
    # mirror image of 0/10
    (10, 10, (0.7225, 1.0)),
    # p=.7: center=(.7+.19207)/1.38415=.64449; half=1.41600*sqrt(.021+.0096037)=.24771
    (7, 10, (0.3968, 0.8922)),
    (0, 0, (0.0, 1.0)),  # no data: the whole unit interval
])
def test_wilson_interval(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-3)
    assert hi == pytest.approx(expected[1], abs=1e-3)
    assert 0.0 <= lo <= hi <= 1.0


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@pytest.mark.parametrize("b01,b10,expected", [
    (0, 5, 0.0625),      # n=5, k=0: 2 * C(5,0)/2^5 = 2/32
    (5, 0, 0.0625),      # symmetric
    (1, 6, 0.125),       # n=7, k=1: 2 * (1+7)/128 = 16/128
    (2, 8, 0.109375),    # n=10, k=2: 2 * (1+10+45)/1024 = 112/1024
    (3, 3, 1.0),         # n=6, k=3: 2 * (1+6+15+20)/64 = 84/64 -> clipped to 1
    (0, 0, 1.0),         # no discordant pairs
])
def test_mcnemar_exact(b01, b10, expected):
    a, b = _pairs(b01, b10, concordant=4)  # concordant pairs must not change p
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_all_wrong_to_right():
    # a all right, b all wrong on 5 questions: b10=5 -> 2/32
    assert mcnemar_exact([T] * 5, [F] * 5) == pytest.approx(0.0625)


def test_mcnemar_large_n_no_overflow():
    # n=2000 discordant, split 1000/1000: the CDF at the median is > 1/2, so p clips to 1
    a, b = _pairs(1000, 1000)
    assert mcnemar_exact(a, b) == 1.0
    # all 2000 one way: p = 2/2^2000, which underflows to 0.0 as a float but must not raise
    a, b = _pairs(0, 2000)
    assert mcnemar_exact(a, b) < 1e-300


def test_mcnemar_length_mismatch():
    with pytest.raises(ValueError):
        mcnemar_exact([T, F], [T])


def test_auroc_hand_cases():
    # positives {0.35, 0.8}, negatives {0.1, 0.4}: 0.35>0.1, 0.35<0.4, 0.8>both -> 3/4
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == pytest.approx(1.0)  # perfect
    assert auroc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(0.0)  # reversed
    assert auroc([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(0.5)             # all tied
    # positives {0.5, 0.9}, negatives {0.5, 0.2}: 0.5~0.5 (1/2) + 0.5>0.2 + 0.9>both = 3.5/4
    assert auroc([0.5, 0.5, 0.2, 0.9], [T, F, F, T]) == pytest.approx(0.875)


def test_auroc_one_class_and_errors():
    assert math.isnan(auroc([0.1, 0.9], [1, 1]))
    assert math.isnan(auroc([0.1, 0.9], [0.0, 0.0]))
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [1])
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [1, 2])  # labels must be binary


def test_balanced_accuracy():
    # recall on positives 3/3 = 1, on negatives 0/1 = 0 -> 0.5 (plain accuracy would be 0.75)
    assert balanced_accuracy([1, 1, 1, 1], [1, 1, 1, 0]) == pytest.approx(0.5)
    # positives idx 0-3, preds 1,0,1,1 -> 3/4; negatives idx 4-6, preds 0,0,1 -> 2/3;
    # (0.75 + 0.666667)/2 = 0.708333 (plain accuracy 5/7 = 0.714286)
    assert balanced_accuracy([1, 0, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0, 0]) == pytest.approx(17 / 24)
    # only positives present: recall 2/3
    assert balanced_accuracy([T, F, T], [T, T, T]) == pytest.approx(2 / 3)
    assert math.isnan(balanced_accuracy([], []))
    with pytest.raises(ValueError):
        balanced_accuracy([1, 0], [1])


def test_paired_summary():
    base = [T, T] + [F] * 8             # 2/10
    refined = [T, T] + [T] * 5 + [F] * 3  # 7/10; b01 = 5, b10 = 0 -> p = 2/32
    worse = [T] + [F] * 9               # 1/10; b01 = 0, b10 = 1 -> p = 2 * 1/2 = 1
    out = paired_summary({"greedy": base, "refined": refined, "worse": worse}, baseline="greedy")
    assert set(out) == {"greedy", "refined", "worse"}
    assert out["greedy"]["p_vs_baseline"] == 1.0
    assert out["refined"]["acc"] == pytest.approx(0.7)
    assert out["refined"]["n"] == 10
    assert out["refined"]["p_vs_baseline"] == pytest.approx(0.0625)
    assert out["worse"]["p_vs_baseline"] == pytest.approx(1.0)
    lo, hi = out["refined"]["ci95"]     # Wilson 7/10, see test_wilson_interval
    assert (lo, hi) == (pytest.approx(0.3968, abs=1e-3), pytest.approx(0.8922, abs=1e-3))
    with pytest.raises(ValueError):
        paired_summary({"a": base}, baseline="missing")
    with pytest.raises(ValueError):
        paired_summary({"a": base, "b": base[:5]}, baseline="a")


def test_mean_ci():
    # mean .6, sd = sqrt((.01+0+.01)/2) = .1, df=2 -> t=4.303, half = 4.303*.1/sqrt(3) = .248435
    m, lo, hi = mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6)
    assert hi - m == pytest.approx(0.248435, abs=1e-5)
    assert m - lo == pytest.approx(0.248435, abs=1e-5)
    # [1, 3]: mean 2, sd sqrt(2), df=1 -> half = 12.706*sqrt(2)/sqrt(2) = 12.706
    assert mean_ci([1.0, 3.0]) == pytest.approx((2.0, -10.706, 14.706))
    # 32 values alternating 0/1 (df=31 > 30 -> 1.96): sd = sqrt(32*.25/31) = .508001,
    # half = 1.96*.508001/sqrt(32) = .176015
    m, lo, hi = mean_ci([0.0, 1.0] * 16)
    assert m == pytest.approx(0.5)
    assert hi - m == pytest.approx(0.176015, abs=1e-4)


def test_mean_ci_single_value():
    m, lo, hi = mean_ci([0.42])
    assert m == pytest.approx(0.42)
    assert math.isnan(lo) and math.isnan(hi)


def test_average_ranks_share_ties():
    assert _average_ranks(np.array([0.3, 0.1, 0.3, 0.2, 0.3])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_cluster_bootstrap_hand_case():
    values = np.array([1.0, -1.0])
    # Two clusters: resamples {0,0}, {0,1}, {1,0}, {1,1} give means 1, 0, 0, -1 (probabilities 1/4, 1/2, 1/4):
    # 3/4 of resamples on each side of 0 (inclusive), so p = 1; the percentiles reach both ends.
    out = cluster_bootstrap(lambda idx: float(values[idx].mean()), 2, resamples=4000, seed=1)
    assert out["diff"] == 0.0 and out["p"] == 1.0 and out["ci95"] == [-1.0, 1.0] and out["resamples"] == 4000
    # A gap present in every resample: p is 0 and the interval is the gap itself.
    assert cluster_bootstrap(lambda idx: 0.25, 5, resamples=50) == {"diff": 0.25, "ci95": [0.25, 0.25], "p": 0.0,
                                                                    "resamples": 50}
    # Undefined resamples are dropped and counted; the same seed draws the same resamples.
    flaky = lambda idx: float("nan") if 0 not in idx else float(len(set(idx.tolist())))  # noqa: E731
    a, b = (cluster_bootstrap(flaky, 3, resamples=200, seed=7) for _ in range(2))
    assert a == b and 0 < a["resamples"] < 200
    with pytest.raises(ValueError, match="at least one cluster"):
        cluster_bootstrap(lambda idx: 0.0, 0)
