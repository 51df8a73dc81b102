"""Training pairs for the global and local refiners (GLoRe section 3.3).

Global: (question, wrong draft) -> a right solution of the same question,
both drawn from the policy's own samples, so the refiner learns to fix the
mistakes this policy actually makes.

Local: (question, draft with [BAD] before its first step the SORM labels
negative) -> a verified rollout continuation from the last positive prefix.
The continuation starts exactly where the marker is, which is what makes the
refinement local: the steps before the marker are kept verbatim.

The SORM's rollouts are drafts too, paired as the paper pairs them (GLoRe
Figure 1): if step i is a solution's first negative step, every rollout of the
prefix through step i failed, so each is a draft whose first wrong step is i
(the prefix before it is still solvable, the prefix through it is not); a
verified rollout of the prefix before step i is its target. That gives up to
K local pairs per labelled wrong solution instead of one (`source: "rollout"`).
An earlier version drew the drafts from the failed rollouts of the positive
prefix before step i instead; their marked step was a rollout's own first
line, which often was right: on the demo's labels (3 seeds) the marked step
was the true first wrong step in 57-66% of those pairs, against 65-73% here.

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
from glore_jax.recipe.sorm_labels import LabelledSolution, calculations_hold, prefix_text
from glore_jax.tasks import is_correct, join_solution, solution_lines


def global_pairs(samples: Sequence[tuple[str, str, Sequence[str]]], *, max_per_question: int = 4,
                 seed: int = 0, references: dict[str, str] | None = None,
                 check_arithmetic: bool = False) -> list[dict]:
    """samples: (question, gold, sampled solutions). Pairs each wrong sample with a random right one.

    check_arithmetic: a right answer reached through a false calculation
    (`sorm_labels.calculations_hold`) is no target: a refiner trained on it
    learns the slip. On the demo's samples that was 12-29% of targets.
    """
    rng = random.Random(seed)
    pairs = []
    for question, gold, sols in samples:
        right = sorted({s for s in sols if is_correct(s, gold) and (not check_arithmetic or calculations_hold(s))})
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


def local_pairs(labelled: Sequence[LabelledSolution], *, seed: int = 0, references: dict[str, str] | None = None,
                from_rollouts: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Local pairs from wrong, SORM-labelled solutions, plus counts of why others were skipped.

    from_rollouts: also pair the failed rollouts through each first negative step
    with verified ones (`rollout_pairs`).
    """
    rng = random.Random(seed)
    pairs, skipped = [], {"draft_correct": 0, "no_verified_continuation": 0, "no_final_line": 0}
    if from_rollouts:
        pairs.extend(rollout_pairs(labelled, seed=seed))
    for sol in labelled:
        if is_correct(sol.solution, sol.gold):
            skipped["draft_correct"] += 1
            continue
        bad = last_positive_prefix(sol)    # all steps solvable: the final line is the mistake
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


def last_positive_prefix(sol: LabelledSolution) -> int:
    """How many leading steps are still solvable: the first negative step, or all steps if none is."""
    bad = sol.first_negative
    return len(sol.steps) if bad is None else bad


def rollout_pairs(labelled: Sequence[LabelledSolution], *, seed: int = 0) -> list[dict]:
    """Local pairs from the SORM rollouts around each wrong solution's first negative step i: failed -> verified.

    The draft is the solution's steps through i plus a failed rollout of that
    prefix, marked at step i; the target is the steps before i plus a verified
    rollout of that shorter, positive prefix. A solution whose steps are all
    positive (only its final line is wrong, or it is right) has no negative
    prefix to draw from. Duplicate drafts of one question, and a draft equal
    to the solution itself (its own pair comes from `local_pairs`), are
    paired once.
    """
    rng = random.Random(seed)
    pairs, seen = [], set()
    for sol in labelled:
        i = last_positive_prefix(sol)
        if i + 1 >= len(sol.rollouts):
            continue
        good = sorted({c for c, v in zip(sol.rollouts[i], sol.verified[i]) if v})
        if not good:
            continue
        bad_prefix = prefix_text(sol.steps, i + 1)
        for cont in sorted({c for c, v in zip(sol.rollouts[i + 1], sol.verified[i + 1]) if not v}):
            draft = bad_prefix + cont
            # A rollout that reached the gold answer but failed the intermediate check is no draft to fix.
            if (sol.question, draft) in seen or draft == sol.solution or is_correct(draft, sol.gold):
                continue
            seen.add((sol.question, draft))
            pairs.append({"question": sol.question, "gold": sol.gold, "draft": draft, "bad_step": i,
                          "target": prefix_text(sol.steps, i) + rng.choice(good), "source": "rollout"})
    return pairs
