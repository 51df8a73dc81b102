"""Small, dependency-free statistics for reporting GLoRe results honestly.

Why each statistic:
- ``wilson_interval``: accuracy on a few hundred questions is a binomial proportion; the Wilson
  score interval keeps correct coverage near 0 and 1 (where the Wald interval collapses to zero width).
- ``mcnemar_exact``: two methods (e.g. greedy vs. refined) are scored on the *same* questions, so
  their outcomes are paired; McNemar's exact test uses only the discordant questions and is the
  right test of "did refinement change accuracy", unlike an unpaired two-proportion test.
- ``auroc``: a verifier (ORM/SORM) is judged by how well its scores rank correct above incorrect
  solutions, independent of any threshold; ties count 1/2 (Mann-Whitney U).
- ``balanced_accuracy``: thresholded verifier accuracy is misleading when most solutions are
  correct (or wrong); averaging the per-class recalls removes that base-rate effect.
- ``paired_summary``: one table row per method with accuracy, Wilson CI and McNemar p vs. a baseline.
- ``cluster_bootstrap``: two value models scored on the same steps differ by a paired amount whose
  sampling error no closed form covers (AUROC, where-accuracy, steps clustered in questions).
- ``mean_ci``: across a handful of training seeds, a Student-t interval (not 1.96) is needed.
Pure numpy + stdlib (no scipy).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

_Z95 = 1.959963984540054
# 0.975 quantiles of Student's t distribution, df = 1..30 (standard table values).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for paired binary outcomes (a, b on the same items)."""
    if len(a) != len(b):
        raise ValueError(f"mcnemar_exact: paired outcomes differ in length ({len(a)} vs {len(b)})")
    b01 = sum(1 for x, y in zip(a, b) if not x and y)
    b10 = sum(1 for x, y in zip(a, b) if x and not y)
    n = b01 + b10
    if n == 0:
        return 1.0
    k = min(b01, b10)
    tail = sum(math.comb(n, i) for i in range(k + 1))  # exact integer arithmetic
    return min(1.0, 2 * tail / 2 ** n)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (vectorised: the bootstrap calls it often)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def _as_binary(v, name: str) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64).reshape(-1)
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be binary (0/1 or bool)")
    return arr == 1


def auroc(scores: Sequence[float], labels: Sequence[float]) -> float:
    """P(random positive scores above random negative), ties 1/2; nan if a class is empty."""
    if len(scores) != len(labels):
        raise ValueError(f"auroc: scores and labels differ in length ({len(scores)} vs {len(labels)})")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _as_binary(labels, "labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def balanced_accuracy(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Mean of per-class recalls; recall of the present class if one is absent; nan if empty."""
    if len(preds) != len(labels):
        raise ValueError(f"balanced_accuracy: preds and labels differ in length ({len(preds)} vs {len(labels)})")
    p = _as_binary(preds, "preds")
    y = _as_binary(labels, "labels")
    recalls = [float(np.mean(p[m] == y[m])) for m in (y, ~y) if m.any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def paired_summary(rows: dict[str, Sequence[bool]], baseline: str) -> dict:
    """Per row: accuracy, Wilson 95% CI, exact McNemar p vs the baseline row, and n."""
    if baseline not in rows:
        raise ValueError(f"paired_summary: baseline {baseline!r} not among rows {sorted(rows)}")
    out = {}
    for name, outcomes in rows.items():
        n = len(outcomes)
        k = sum(1 for x in outcomes if x)
        lo, hi = wilson_interval(k, n)
        p = 1.0 if name == baseline else mcnemar_exact(rows[baseline], outcomes)
        out[name] = {"acc": k / n if n else float("nan"), "ci95": [lo, hi],
                     "p_vs_baseline": p, "n": n}
    return out


def cluster_bootstrap(statistic: Callable[[np.ndarray], float], clusters: int, *, resamples: int = 1000,
                      seed: int = 0) -> dict:
    """A paired difference's 95% percentile interval, resampling clusters (questions) with replacement.

    `statistic(indices)` computes the difference (e.g. SORM minus ORM step AUROC) on the clusters at
    `indices`, repeats included; both models are scored on the same resample, so the interval is for
    the paired difference. Steps of one solution, and solutions of one question, are correlated:
    resampling questions keeps that. p: twice the share of resamples on the far side of 0 (a
    percentile-bootstrap test of "no difference"); resamples where the statistic is undefined (a
    class absent) are dropped and counted.
    """
    if clusters <= 0:
        raise ValueError(f"cluster_bootstrap needs at least one cluster, got {clusters}")
    rng = np.random.default_rng(seed)
    point = float(statistic(np.arange(clusters)))
    draws = np.array([statistic(rng.integers(0, clusters, clusters)) for _ in range(resamples)], dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return {"diff": point, "ci95": [float("nan")] * 2, "p": float("nan"), "resamples": 0}
    lo, hi = np.percentile(draws, [2.5, 97.5])
    p = min(1.0, 2.0 * min(float(np.mean(draws <= 0)), float(np.mean(draws >= 0))))
    return {"diff": point, "ci95": [float(lo), float(hi)], "p": p, "resamples": int(draws.size)}


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t 95% interval over seeds; (v, nan, nan) for a single value."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size == 1:
        return mean, float("nan"), float("nan")
    df = v.size - 1
    t = _T975[df - 1] if df <= len(_T975) else _Z95
    half = t * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half
