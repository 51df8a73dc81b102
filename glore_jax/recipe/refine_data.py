"""Training pairs for the global and local refiners (GLoRe section 3.3).

Global: (question, wrong draft) -> a right solution of the same question,
both drawn from the policy's own samples, so the refiner learns to fix the
mistakes this policy actually makes.

Local: (question, draft with [BAD] before its first step the SORM labels
negative) -> a verified rollout continuation from the last positive prefix.
The continuation starts exactly where the marker is, which is what makes the
refinement local: the steps before the marker are kept verbatim.

Reference fallback (`references`, optional): when the policy produced no
right sample of a question (global) or no verified continuation (local),
the train set's reference solution is the target (local: its steps from the
marked step on). A weak early policy then still yields training pairs; the
pairs are counted separately so a report shows how on-policy the data was.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from glore_jax.prompts import num_scorable_positions
from glore_jax.recipe.sorm_labels import LabelledSolution, prefix_text
from glore_jax.tasks import is_correct, join_solution, solution_lines


def global_pairs(samples: Sequence[tuple[str, str, Sequence[str]]], *, max_per_question: int = 4,
                 seed: int = 0, references: dict[str, str] | None = None) -> list[dict]:
    """samples: (question, gold, sampled solutions). Pairs each wrong sample with a random right one."""
    rng = random.Random(seed)
    pairs = []
    for question, gold, sols in samples:
        right = sorted({s for s in sols if is_correct(s, gold)})
        wrong = sorted({s for s in sols if not is_correct(s, gold)})
        source = "policy"
        if not right and references and question in references:
            right, source = [references[question]], "reference"
        if not right or not wrong:
            continue
        for draft in rng.sample(wrong, min(len(wrong), max_per_question)):
            pairs.append({"question": question, "gold": gold, "draft": draft, "target": rng.choice(right),
                          "source": source})
    return pairs


def local_pairs(labelled: Sequence[LabelledSolution], *, seed: int = 0,
                references: dict[str, str] | None = None) -> tuple[list[dict], dict[str, int]]:
    """Local pairs from wrong, SORM-labelled solutions, plus counts of why others were skipped."""
    rng = random.Random(seed)
    pairs, skipped = [], {"draft_correct": 0, "no_verified_continuation": 0, "no_final_line": 0}
    for sol in labelled:
        if is_correct(sol.solution, sol.gold):
            skipped["draft_correct"] += 1
            continue
        bad = sol.first_negative
        if bad is None:          # every step can still succeed: the final line is the mistake
            bad = len(sol.steps)
        if bad >= num_scorable_positions(sol.solution):
            skipped["no_final_line"] += 1
            continue
        good = [c for c, ok in zip(sol.rollouts[bad], sol.verified[bad]) if ok]
        source = "policy"
        if not good and references and sol.question in references:
            ref = solution_lines(references[sol.question])
            if bad <= len(ref.steps):
                good, source = [join_solution(ref.steps[bad:], ref.final)], "reference"
        if not good:
            skipped["no_verified_continuation"] += 1
            continue
        # `target` is the full corrected solution (the kept steps, then the
        # verified continuation); the local format trains on its part from `bad_step`.
        pairs.append({"question": sol.question, "gold": sol.gold, "draft": sol.solution, "bad_step": bad,
                      "target": prefix_text(sol.steps, bad) + rng.choice(good), "source": source})
    return pairs, skipped
