"""How well a value model (ORM or SORM) reads steps: accuracy against ground-truth step labels.

Ground truth per scorable position (steps, then the final line) is 1 when the
problem can still be solved after that position:
  * synthetic task: exact, from the step checker (every step before the first
    wrong step is 1, the rest 0; the final line is the answer's correctness);
  * GSM8K: held-out rollout labels (`sorm_labels.label_solutions`, unbalanced),
    as in the paper.
A prediction is positive when P(correct) > 0.5.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from glore_jax.prompts import num_scorable_positions
from glore_jax.tasks import first_wrong_step, is_correct, split_steps


def synthetic_truth(record: Mapping, solution: str) -> list[float]:
    """Exact per-position labels for a synthetic-task solution."""
    n_steps = len(split_steps(solution))
    wrong = first_wrong_step(record, solution)
    steps = [float(wrong is None or i < wrong) for i in range(n_steps)]
    final = [float(is_correct(solution, record["gold"]))]
    return (steps + final)[:num_scorable_positions(solution)]


def value_accuracy(probs: Sequence[np.ndarray], truths: Sequence[Sequence[float]],
                   solutions: Sequence[str], bins: int = 10) -> dict:
    """Step and final accuracy, accuracy per step index, and calibration bins."""
    step_hits, final_hits = [], []
    per_index: dict[int, list[bool]] = defaultdict(list)
    all_p, all_y = [], []
    for p, y, sol in zip(probs, truths, solutions):
        n_steps = len(split_steps(sol))
        n = min(len(p), len(y))
        for i in range(n):
            if y[i] < 0:
                continue
            hit = bool((p[i] > 0.5) == (y[i] > 0.5))
            all_p.append(float(p[i]))
            all_y.append(float(y[i]))
            if i < n_steps:
                step_hits.append(hit)
                per_index[i].append(hit)
            else:
                final_hits.append(hit)
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
        "num_steps": len(step_hits),
        "num_finals": len(final_hits),
        "per_step_accuracy": {str(i): float(np.mean(h)) for i, h in sorted(per_index.items())},
        "calibration": calibration,
    }
