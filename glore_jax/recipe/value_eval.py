"""How well a value model (ORM or SORM) reads steps: accuracy against ground-truth step labels.

Ground truth per scorable position (steps, then the final line) is 1 when the
problem can still be solved after that position:
  * synthetic task: exact, from the step checker (every step before the first
    wrong step is 1, the rest 0; the final line is the answer's correctness);
  * GSM8K: held-out rollout labels (`sorm_labels.label_solutions`, unbalanced),
    as in the paper.
A prediction is positive when P(correct) > 0.5.

Accuracy alone flatters a model on skewed data (with most samples wrong, a
model that always says "wrong" scores high), so the report also gives
threshold-free AUROC, balanced accuracy, and where-accuracy: on wrong
samples, how often the step the inference locator picks (`first_bad_step`,
the rule local refinement uses) is exactly the first wrong step. The locator
reads each model at its own threshold (`calibrate_locator`, chosen on
validation questions); where-accuracy at 0.5 is reported beside it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from glore_jax.prompts import num_scorable_positions
from glore_jax.recipe import stats
from glore_jax.recipe.inference import first_bad_step
from glore_jax.tasks import first_wrong_step, is_correct, split_steps


def synthetic_truth(record: Mapping, solution: str) -> list[float]:
    """Exact per-position labels for a synthetic-task solution."""
    n_steps = len(split_steps(solution))
    wrong = first_wrong_step(record, solution)
    steps = [float(wrong is None or i < wrong) for i in range(n_steps)]
    final = [float(is_correct(solution, record["gold"]))]
    return (steps + final)[:num_scorable_positions(solution)]


def label_quality(labels: Sequence[Sequence[float]], truths: Sequence[Sequence[float]]) -> dict:
    """Rollout labels against exact truth, position by position (-1 = masked, skipped).

    Positive = "still solvable". precision: P(truth 1 | label 1), the share of
    steps the labels vouch for that really are right; recall: P(label 1 | truth 1).
    """
    tp = fp = fn = tn = 0
    for lab, tru in zip(labels, truths):
        for a, b in zip(lab, tru):
            if a < 0 or b < 0:
                continue
            tp += a > 0.5 and b > 0.5
            fp += a > 0.5 and b <= 0.5
            fn += a <= 0.5 and b > 0.5
            tn += a <= 0.5 and b <= 0.5
    n = tp + fp + fn + tn
    nan = float("nan")
    return {"precision": tp / (tp + fp) if tp + fp else nan, "recall": tp / (tp + fn) if tp + fn else nan,
            "accuracy": (tp + tn) / n if n else nan, "labels": n}


def where_accuracy(probs: Sequence[np.ndarray], truths: Sequence[Sequence[float]], threshold: float) -> float:
    """On wrong solutions (truth has a 0), the share whose first wrong position `first_bad_step` finds exactly."""
    hits = []
    for p, y in zip(probs, truths):
        n = min(len(p), len(y))
        first = next((i for i in range(n) if y[i] < 0.5), None)
        if first is not None:
            hits.append(first_bad_step(np.asarray(p[:n]), threshold) == first)
    return float(np.mean(hits)) if hits else float("nan")


LOCATOR_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))   # 0.05 .. 0.95


def calibrate_locator(probs: Sequence[np.ndarray], truths: Sequence[Sequence[float]],
                      grid: Sequence[float] = LOCATOR_GRID) -> tuple[float, dict[str, float]]:
    """The locator threshold with the highest where-accuracy on these (validation) solutions, and the curve.

    A value model trained on balanced step labels (the SORM) or on final answers only (the ORM) is
    not calibrated for "is this the first wrong step": 0.5 is the balanced set's midpoint, not the
    policy's. Each model gets its own threshold, chosen on validation questions, never on test; ties
    go to the grid point nearest 0.5, and 0.5 wins an empty set (no wrong solution to learn from).
    """
    curve = {f"{t:.2f}": where_accuracy(probs, truths, t) for t in grid}
    scored = [(acc, -abs(t - 0.5), t) for t, acc in zip(grid, curve.values()) if not np.isnan(acc)]
    return (max(scored)[2] if scored else 0.5), curve


def value_accuracy(probs: Sequence[np.ndarray], truths: Sequence[Sequence[float]],
                   solutions: Sequence[str], bins: int = 10, threshold: float = 0.5,
                   where_threshold: float | None = None) -> dict:
    """Step and final accuracy, AUROC and balanced accuracy (positive: P > threshold), where-accuracy
    (the locator at `where_threshold`, default `threshold`, and at 0.5), per-index accuracy, calibration."""
    where_threshold = threshold if where_threshold is None else where_threshold
    step_hits, final_hits = [], []
    step_p, step_y, final_p, final_y = [], [], [], []
    per_index: dict[int, list[bool]] = defaultdict(list)
    all_p, all_y = [], []
    for p, y, sol in zip(probs, truths, solutions):
        n_steps = len(split_steps(sol))
        n = min(len(p), len(y))
        for i in range(n):
            if y[i] < 0:
                continue
            hit = bool((p[i] > threshold) == (y[i] > 0.5))
            all_p.append(float(p[i]))
            all_y.append(float(y[i]))
            if i < n_steps:
                step_hits.append(hit)
                per_index[i].append(hit)
                step_p.append(float(p[i]))
                step_y.append(float(y[i]))
            else:
                final_hits.append(hit)
                final_p.append(float(p[i]))
                final_y.append(float(y[i]))
    edges = np.linspace(0.0, 1.0, bins + 1)
    all_p_arr, all_y_arr = np.asarray(all_p), np.asarray(all_y)
    calibration = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (all_p_arr >= lo) & ((all_p_arr < hi) | (hi == 1.0))
        if sel.any():
            calibration.append({"bin": [float(lo), float(hi)], "mean_pred": float(all_p_arr[sel].mean()),
                                "frac_positive": float(all_y_arr[sel].mean()), "count": int(sel.sum())})
    return {
        "step_accuracy": float(np.mean(step_hits)) if step_hits else float("nan"),
        "final_accuracy": float(np.mean(final_hits)) if final_hits else float("nan"),
        "step_auroc": stats.auroc(step_p, step_y),
        "step_balanced_accuracy": stats.balanced_accuracy([float(x > threshold) for x in step_p], step_y),
        "final_auroc": stats.auroc(final_p, final_y),
        "where_accuracy": where_accuracy(probs, truths, where_threshold),
        "where_threshold": where_threshold,
        "where_accuracy_at_half": where_accuracy(probs, truths, 0.5),
        "num_steps": len(step_hits),
        "num_finals": len(final_hits),
        "per_step_accuracy": {str(i): float(np.mean(h)) for i, h in sorted(per_index.items())},
        "calibration": calibration,
    }


def compare(probs_a: Sequence[np.ndarray], probs_b: Sequence[np.ndarray], truths: Sequence[Sequence[float]],
            solutions: Sequence[str], clusters: Sequence[int], *, threshold: float = 0.5,
            threshold_b: float | None = None, resamples: int = 2000, seed: int = 0) -> dict:
    """Model b minus model a (the SORM minus the ORM) on the same solutions: step AUROC and where-accuracy,
    each with a 95% interval and p from a bootstrap over `clusters` (each solution's question).
    Where-accuracy reads model a's locator at `threshold` and b's at `threshold_b` (default: the same).

    One seed's gap between the two models is a few hundredths of AUROC; whether that is a direction
    or noise is what the interval says.
    """
    if not len(probs_a) == len(probs_b) == len(truths) == len(solutions) == len(clusters):
        raise ValueError("compare: probs_a, probs_b, truths, solutions and clusters must have one entry per solution")
    ids = {c: k for k, c in enumerate(dict.fromkeys(clusters))}
    steps: list[list[int]] = [[] for _ in ids]
    wrong: list[list[int]] = [[] for _ in ids]
    pa, pb, y, hit_a, hit_b = [], [], [], [], []
    for p_a, p_b, t, sol, c in zip(probs_a, probs_b, truths, solutions, clusters):
        n = min(len(p_a), len(p_b), len(t))
        for i in range(min(n, len(split_steps(sol)))):   # steps only, as value_accuracy's step AUROC
            if t[i] >= 0:
                steps[ids[c]].append(len(y))
                pa.append(float(p_a[i]))
                pb.append(float(p_b[i]))
                y.append(float(t[i] > 0.5))
        first = next((i for i in range(n) if t[i] < 0.5), None)   # as where_accuracy
        if first is not None:
            wrong[ids[c]].append(len(hit_a))
            hit_a.append(first_bad_step(np.asarray(p_a[:n]), threshold) == first)
            hit_b.append(first_bad_step(np.asarray(p_b[:n]), threshold if threshold_b is None else threshold_b)
                         == first)
    pa_arr, pb_arr, y_arr = np.asarray(pa), np.asarray(pb), np.asarray(y)
    ha, hb = np.asarray(hit_a, dtype=np.float64), np.asarray(hit_b, dtype=np.float64)
    steps_of = [np.asarray(s, dtype=np.int64) for s in steps]
    wrong_of = [np.asarray(w, dtype=np.int64) for w in wrong]

    def auroc_gap(idx: np.ndarray) -> float:
        sel = np.concatenate([steps_of[i] for i in idx])
        return stats.auroc(pb_arr[sel], y_arr[sel]) - stats.auroc(pa_arr[sel], y_arr[sel])

    def where_gap(idx: np.ndarray) -> float:
        sel = np.concatenate([wrong_of[i] for i in idx])
        return float(hb[sel].mean() - ha[sel].mean()) if sel.size else float("nan")

    return {"step_auroc": stats.cluster_bootstrap(auroc_gap, len(ids), resamples=resamples, seed=seed),
            "where_accuracy": stats.cluster_bootstrap(where_gap, len(ids), resamples=resamples, seed=seed)}
