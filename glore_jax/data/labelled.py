"""Labelled records made from the synthetic task alone, without a trained policy.

The ORM, SORM and refiners normally learn from a policy's samples. For
tests, smoke runs and standalone experiments the synthetic generator can
stand in: each problem gets either its reference solution or one corrupted
by `inject_error`, and since every intermediate value is known,
`first_wrong_step` labels it exactly:
    sorm step_labels  1 before the first wrong step, 0 from it on;
    orm  correct      final-answer correctness (the ORM format repeats it per step);
    refiners          draft = a corrupted solution, bad_step = its first wrong step,
                      target = the reference solution.
Records are built lazily and deterministically from (seed, index), so the
source is random-access like any other and a resumed run sees the same data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from glore_jax import prompts
from glore_jax.errors import DataError
from glore_jax.tasks import ERROR_KINDS, first_wrong_step, inject_error, is_correct


def _corrupt(meta: dict[str, Any], rng: random.Random) -> str:
    for _ in range(10):
        try:
            return inject_error(meta, rng.randrange(len(meta["steps"])), rng.choice(ERROR_KINDS), rng)
        except ValueError:  # an undetectable 'drop'; draw again
            continue
    return inject_error(meta, 0, "arithmetic", rng)


def step_labels(meta: dict[str, Any], solution: str) -> list[float]:
    """SORM labels of a synthetic solution: 1 for each step before the first wrong one, then 0."""
    n = prompts.num_scorable_positions(solution)
    wrong = first_wrong_step(meta, solution)
    wrong = n if wrong is None else min(wrong, n)
    return [1.0] * wrong + [0.0] * (n - wrong)


class SyntheticLabelled(Sequence):
    """Wraps a synthetic task split; record i is labelled as described in the module doc."""

    def __init__(self, source: Sequence[dict[str, Any]], *, seed: int = 0, correct_fraction: float = 0.5):
        if not 0.0 <= correct_fraction <= 1.0:
            raise ValueError(f"correct_fraction must be in [0, 1], got {correct_fraction}")
        self._source, self._seed, self._correct_fraction = source, seed, correct_fraction

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        record = self._source[index]
        if "meta" not in record or "steps" not in json.loads(record["meta"] or "{}"):
            raise DataError("SyntheticLabelled needs synthetic task records (with per-step meta); "
                             f"record {index} has meta {record.get('meta')!r}")
        meta = json.loads(record["meta"])
        rng = random.Random(f"glore-labelled/{self._seed}/{index % len(self)}")
        reference = record["answer"]
        draft = _corrupt(meta, rng)
        solution = reference if rng.random() < self._correct_fraction else _corrupt(meta, rng)
        labels = step_labels(meta, solution)
        bad = first_wrong_step(meta, draft)
        return {"id": record["id"], "question": record["question"], "gold": record["gold"],
                "solution": solution, "correct": is_correct(solution, record["gold"]),
                "step_labels": labels, "draft": draft, "bad_step": 0 if bad is None else bad,
                "target": reference}
