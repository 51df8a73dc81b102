"""When, where and how to refine (GLoRe section 4), and the rows the paper compares.

  when  the ORM's P(correct) of the greedy draft is below `orm_threshold`;
  where the first step whose SORM value falls below `sorm_threshold`
        (the lowest-valued position if none does);
  how   a global refinement (a new solution) and a local one (a new
        continuation from the marked step); the ORM reranks
        {draft, global, local} and the draft wins ties.

Every refinement is computed for every draft, so the gated rows, the oracle
rows and the fix/break rates all come from one set of generations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from glore_jax import prompts
from glore_jax.recipe.scoring import ValueScorer
from glore_jax.recipe.textgen import TextGenerator
from glore_jax.tasks import is_correct


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceConfig:
    orm_threshold: float = 0.5
    sorm_threshold: float = 0.5
    best_of: int = 3
    temperature: float = 0.7


def rerank(scores: Sequence[float]) -> int:
    """Index of the highest ORM score; the earliest candidate (the draft) wins ties."""
    return int(np.argmax(np.asarray(scores, np.float64)))


def first_bad_step(step_probs: np.ndarray, threshold: float) -> int:
    """The first scorable position below `threshold`, else the lowest-valued one (0 if none)."""
    if len(step_probs) == 0:
        return 0
    below = np.nonzero(np.asarray(step_probs) < threshold)[0]
    return int(below[0]) if len(below) else int(np.argmin(step_probs))


def _rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else 0.0


def run_inference(items: Sequence[tuple[str, str]], *, policy: TextGenerator, global_refiner: TextGenerator,
                  local_refiner: TextGenerator, orm: ValueScorer, sorm: ValueScorer, config: InferenceConfig,
                  seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """items: (question, gold). Returns (the comparison rows, one detail dict per question)."""
    tok = policy.tokenizer
    questions = [q for q, _ in items]
    drafts = [c[0] for c in policy.complete([prompts.policy_prompt(tok, q) for q in questions])]
    samples = policy.complete([prompts.policy_prompt(tok, q) for q in questions], k=config.best_of,
                              temperature=config.temperature, seed=seed)

    orm_draft = orm.final_probs(list(zip(questions, drafts)))
    sorm_steps = sorm.step_probs(list(zip(questions, drafts)))
    bad_steps = [min(first_bad_step(p, config.sorm_threshold), prompts.num_scorable_positions(d) - 1)
                 for p, d in zip(sorm_steps, drafts)]
    global_out = [c[0] for c in global_refiner.complete(
        [prompts.global_refiner_prompt(tok, q, d) for q, d in zip(questions, drafts)])]
    local_prompts, local_ok = [], []
    for q, d, b in zip(questions, drafts, bad_steps):
        ok = prompts.num_scorable_positions(d) > 0
        local_ok.append(ok)
        # A draft with no recognisable lines cannot be marked; its local refinement is a fresh solution.
        local_prompts.append(prompts.local_refiner_prompt(tok, q, d, b) if ok else prompts.policy_prompt(tok, q))
    local_cont = [c[0] for c in local_refiner.complete(local_prompts)]
    local_out = [prompts.splice_local(d, b, c) if ok else c
                 for d, b, c, ok in zip(drafts, bad_steps, local_cont, local_ok)]

    orm_global = orm.final_probs(list(zip(questions, global_out)))
    orm_local = orm.final_probs(list(zip(questions, local_out)))
    flat_samples = [(q, s) for q, ss in zip(questions, samples) for s in ss]
    orm_samples = orm.final_probs(flat_samples).reshape(len(items), config.best_of)

    rows, acc = [], {k: [] for k in ("greedy", f"best_of_{config.best_of}", "global", "local", "glore",
                                     "oracle", "oracle_any")}
    fixes = {"global": [], "local": []}
    breaks = {"global": [], "local": []}
    for i, (q, gold) in enumerate(items):
        right = {name: is_correct(sol, gold) for name, sol in
                 (("draft", drafts[i]), ("global", global_out[i]), ("local", local_out[i]))}
        scores = {"draft": orm_draft[i], "global": orm_global[i], "local": orm_local[i]}
        refine = bool(orm_draft[i] < config.orm_threshold)

        def pick(names, gate):
            if not gate:
                return right["draft"]
            return right[names[rerank([scores[n] for n in names])]]

        acc["greedy"].append(right["draft"])
        acc[f"best_of_{config.best_of}"].append(is_correct(samples[i][rerank(orm_samples[i])], gold))
        acc["global"].append(pick(["draft", "global"], refine))
        acc["local"].append(pick(["draft", "local"], refine))
        acc["glore"].append(pick(["draft", "global", "local"], refine))
        acc["oracle"].append(pick(["draft", "global", "local"], not right["draft"]))
        acc["oracle_any"].append(right["draft"] or right["global"] or right["local"])
        for name in ("global", "local"):
            (breaks if right["draft"] else fixes)[name].append(right[name] != right["draft"])
        rows.append({"question": q, "gold": gold, "draft": drafts[i], "global": global_out[i],
                     "local": local_out[i], "bad_step": bad_steps[i], "refine": refine,
                     "orm": {k: float(v) for k, v in scores.items()}, "correct": right,
                     "sorm_steps": [float(x) for x in sorm_steps[i]], "samples": samples[i]})
    results = {k: _rate(v) for k, v in acc.items()}
    results["refine_rate"] = _rate([r["refine"] for r in rows])
    for name in ("global", "local"):
        results[f"{name}_fixed_wrong"] = _rate(fixes[name])
        results[f"{name}_broke_right"] = _rate(breaks[name])
    return results, rows
