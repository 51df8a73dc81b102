"""When, where and how to refine (GLoRe section 4), and the rows the paper compares.

  when  the ORM's P(correct) of the greedy draft is below `orm_threshold`,
        a threshold calibrated on validation questions (`calibrate_threshold`);
  where the first step whose SORM value falls below `sorm_threshold`
        (the lowest-valued position if none does);
  how   a global refinement (a new solution) and a local one (a new
        continuation from the marked step); the ORM reranks
        {draft, global, local} and the draft wins ties.

`generate` computes every candidate for every question once (draft, both
refinements, `best_of` samples, and their ORM scores); `outcomes` then applies
a gate to those rows. So the gated rows, the oracle rows, the fix/break rates
and the threshold search all read one set of generations.

Baselines: greedy; best-of-N samples reranked by the ORM; and the like-for-like
one, the greedy draft plus N-1 samples reranked by the ORM, which has as many
candidates as GLoRe (draft, global, local) and the same draft among them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from glore_jax import prompts
from glore_jax.recipe import stats
from glore_jax.sampling import Generator
from glore_jax.scoring import ValueScorer
from glore_jax.tasks import is_correct


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceConfig:
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


def refine(questions: Sequence[str], drafts: Sequence[str], *, global_refiner: Generator,
           local_refiner: Generator, sorm: ValueScorer, sorm_threshold: float) -> dict[str, list]:
    """Where and how: the SORM's step values and marked step, and a global and a local refinement of each draft."""
    tok = global_refiner.tokenizer
    sorm_steps = sorm.step_probs(list(zip(questions, drafts)))
    bad_steps = [min(first_bad_step(p, sorm_threshold), prompts.num_scorable_positions(d) - 1)
                 for p, d in zip(sorm_steps, drafts)]
    global_out = [c[0] for c in global_refiner.complete(
        [prompts.get("global_refiner").prompt(tok, {"question": q, "draft": d}) for q, d in zip(questions, drafts)])]
    local_prompts, local_ok = [], []
    for q, d, b in zip(questions, drafts, bad_steps):
        ok = prompts.num_scorable_positions(d) > 0
        local_ok.append(ok)
        # A draft with no recognisable lines cannot be marked; its local refinement is a fresh solution.
        local_prompts.append(prompts.get("local_refiner" if ok else "policy").prompt(
            tok, {"question": q, "draft": d, "bad_step": b} if ok else {"question": q}))
    local_cont = [c[0] for c in local_refiner.complete(local_prompts)]
    local_out = [prompts.splice_local(d, b, c) if ok else c
                 for d, b, c, ok in zip(drafts, bad_steps, local_cont, local_ok)]
    return {"sorm_steps": sorm_steps, "bad_steps": bad_steps, "global": global_out, "local": local_out}


def generate(items: Sequence[tuple[str, str]], *, policy: Generator, global_refiner: Generator,
             local_refiner: Generator, orm: ValueScorer, sorm: ValueScorer, config: InferenceConfig,
             seed: int = 0) -> list[dict]:
    """items: (question, gold). One row per question with every candidate, its ORM score and correctness."""
    tok = policy.tokenizer
    questions = [q for q, _ in items]
    policy_prompts = [prompts.get("policy").prompt(tok, {"question": q}) for q in questions]
    drafts = [c[0] for c in policy.complete(policy_prompts)]
    samples = policy.complete(policy_prompts, k=config.best_of, temperature=config.temperature, seed=seed)
    refined = refine(questions, drafts, global_refiner=global_refiner, local_refiner=local_refiner, sorm=sorm,
                     sorm_threshold=config.sorm_threshold)
    sorm_steps, bad_steps, global_out, local_out = (refined[k] for k in ("sorm_steps", "bad_steps", "global", "local"))

    scores = {name: orm.final_probs(list(zip(questions, sols)))
              for name, sols in (("draft", drafts), ("global", global_out), ("local", local_out))}
    flat_samples = [(q, s) for q, ss in zip(questions, samples) for s in ss]
    orm_samples = orm.final_probs(flat_samples).reshape(len(items), config.best_of)
    rows = []
    for i, (q, gold) in enumerate(items):
        sols = {"draft": drafts[i], "global": global_out[i], "local": local_out[i]}
        rows.append({"question": q, "gold": gold, **sols, "bad_step": bad_steps[i],
                     "orm": {k: float(v[i]) for k, v in scores.items()},
                     "correct": {k: is_correct(s, gold) for k, s in sols.items()},
                     "sorm_steps": [float(x) for x in sorm_steps[i]], "samples": samples[i],
                     "samples_orm": [float(x) for x in orm_samples[i]],
                     "samples_correct": [is_correct(s, gold) for s in samples[i]]})
    return rows


def _gated(row: dict, names: Sequence[str], refine: bool) -> bool:
    """Whether the answer kept is right: the ORM's pick among `names` if refining, else the draft."""
    return row["correct"][names[rerank([row["orm"][n] for n in names])]] if refine else row["correct"]["draft"]


# The candidate sets the rerank may read, the paper's first (it wins ties).
REFINER_SETS = {"global+local": ("draft", "global", "local"), "global": ("draft", "global"),
                "local": ("draft", "local")}


def outcomes(rows: Sequence[dict], orm_threshold: float,
             chosen: tuple[str, float] | None = None) -> dict[str, list[bool]]:
    """Per-question correctness of every compared method, refining where the draft's ORM score < threshold.

    `chosen` (a `REFINER_SETS` name and its own threshold, from `calibrate_refiners`)
    adds the row `glore_val_set`; `glore` stays the paper's global + local.
    """
    best_of = len(rows[0]["samples"]) if rows else 3
    acc: dict[str, list[bool]] = {k: [] for k in ("greedy", f"best_of_{best_of}", f"greedy_plus_{best_of - 1}",
                                                  "global", "local", "glore", "oracle", "oracle_any")}
    for r in rows:
        right, score = r["correct"], r["orm"]
        refine = score["draft"] < orm_threshold

        pick = lambda names, gate: _gated(r, names, gate)  # noqa: E731

        acc["greedy"].append(right["draft"])
        acc[f"best_of_{best_of}"].append(r["samples_correct"][rerank(r["samples_orm"])])
        plus = [score["draft"]] + r["samples_orm"][:best_of - 1]
        acc[f"greedy_plus_{best_of - 1}"].append(([right["draft"]] + r["samples_correct"])[rerank(plus)])
        acc["global"].append(pick(["draft", "global"], refine))
        acc["local"].append(pick(["draft", "local"], refine))
        acc["glore"].append(pick(["draft", "global", "local"], refine))
        acc["oracle"].append(pick(["draft", "global", "local"], not right["draft"]))
        acc["oracle_any"].append(right["draft"] or right["global"] or right["local"])
        if chosen is not None:
            acc.setdefault("glore_val_set", []).append(pick(list(REFINER_SETS[chosen[0]]), score["draft"] < chosen[1]))
    return acc


def _gate_accuracy(rows: Sequence[dict], threshold: float, names: Sequence[str]) -> float:
    return float(np.mean([_gated(r, names, r["orm"]["draft"] < threshold) for r in rows]))


def calibrate_threshold(rows: Sequence[dict], names: Sequence[str] = REFINER_SETS["global+local"]) -> float:
    """The ORM gate that maximises the accuracy of reranking `names` on `rows` (validation questions, never test).

    Candidates are the midpoints between consecutive distinct draft scores
    (plus 0: never refine, and 1: always); ties go to the lower threshold,
    which refines fewer drafts.
    """
    s = np.unique([r["orm"]["draft"] for r in rows])
    candidates = np.concatenate([[0.0], (s[:-1] + s[1:]) / 2, [1.0 + 1e-9]])
    accs = [_gate_accuracy(rows, float(t), names) for t in candidates]
    return float(candidates[int(np.argmax(accs))])


def calibrate_refiners(rows: Sequence[dict]) -> tuple[str, float]:
    """Which refiners the rerank reads, and their gate, chosen on `rows` (validation, never test).

    Why: when one refiner breaks most right drafts and the ORM ranks its
    outputs poorly (our local refiner: 43-74% broken, candidate AUROC ~0.7-0.76),
    its candidates can take away what the other refiner gains. Ties go to the
    paper's global + local.
    """
    best = None
    for name, names in REFINER_SETS.items():
        t = calibrate_threshold(rows, names)
        acc = _gate_accuracy(rows, t, names)
        if best is None or acc > best[0]:
            best = (acc, name, t)
    return best[1], best[2]


def summarize(rows: Sequence[dict], orm_threshold: float, chosen: tuple[str, float] | None = None) -> dict:
    """Accuracy, 95% Wilson interval and exact McNemar p against greedy for every row; refine and fix/break."""
    acc = outcomes(rows, orm_threshold, chosen)
    table = stats.paired_summary(acc, baseline="greedy")
    results: dict = {k: v["acc"] for k, v in table.items()}
    results["ci95"] = {k: v["ci95"] for k, v in table.items()}
    results["p_vs_greedy"] = {k: v["p_vs_baseline"] for k, v in table.items()}
    results["orm_threshold"] = orm_threshold
    if chosen is not None:
        results["val_refiner_set"], results["val_refiner_set_threshold"] = chosen
    results["refine_rate"] = float(np.mean([r["orm"]["draft"] < orm_threshold for r in rows])) if rows else 0.0
    # A refiner that ignored the draft would do what a fresh policy sample does: the first
    # best-of sample (temperature T) is that baseline, so a refiner is worth its cost only if
    # it fixes more wrong drafts than `resample` does.
    candidates = {"global": lambda r: r["correct"]["global"], "local": lambda r: r["correct"]["local"],
                  "resample": lambda r: r["samples_correct"][0]}
    for name, after_of in candidates.items():
        changed = [(r["correct"]["draft"], after_of(r)) for r in rows]
        wrong = [after for before, after in changed if not before]
        right = [not after for before, after in changed if before]
        results[f"{name}_fixed_wrong"] = float(np.mean(wrong)) if wrong else 0.0
        results[f"{name}_broke_right"] = float(np.mean(right)) if right else 0.0
        results[f"{name}_counts"] = {"fixed": int(sum(wrong)), "wrong_drafts": len(wrong),
                                     "broke": int(sum(right)), "right_drafts": len(right)}
    # The rerank can only keep a fix it can tell from a break: the ORM's AUROC on each candidate kind.
    results["orm_candidate_auroc"] = {
        name: stats.auroc([r["orm"][name] for r in rows], [r["correct"][name] for r in rows])
        if len({r["correct"][name] for r in rows}) == 2 else float("nan") for name in ("draft", "global", "local")}
    return results
