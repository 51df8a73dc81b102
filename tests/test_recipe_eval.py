"""GLoRe recipe logic, its evaluation: where to refine, reranking, threshold and refiner calibration,
value-model measures, the seeds table and the report.

The SORM labels and refinement pairs: `tests/test_recipe.py`.
"""

import json
import os

import numpy as np
import pytest

from glore_jax import prompts
from glore_jax.recipe import inference, seeds, value_eval
from glore_jax.tokenizer import Tokenizer


def test_rerank_picks_the_highest_orm_score_and_the_draft_on_ties():
    assert inference.rerank([0.2, 0.9, 0.5]) == 1
    assert inference.rerank([0.3, 0.1, 0.7]) == 2
    assert inference.rerank([0.6, 0.6, 0.6]) == 0


def test_where_to_refine_is_the_first_step_below_threshold():
    assert inference.first_bad_step(np.array([0.9, 0.7, 0.3, 0.1]), 0.5) == 2
    assert inference.first_bad_step(np.array([0.9, 0.6, 0.8]), 0.5) == 1   # none below: lowest
    assert inference.first_bad_step(np.array([]), 0.5) == 0


def test_value_accuracy_against_exact_synthetic_truth():
    from glore_jax.tasks import SyntheticConfig, generate_split, inject_error
    import json
    import random
    rec = next(generate_split(SyntheticConfig(train_size=5, test_size=5), "test"))
    meta = json.loads(rec["meta"])
    wrong = inject_error(meta, 1, "arithmetic", random.Random(0))
    truth = value_eval.synthetic_truth(rec, wrong)
    n = len(truth)
    assert truth[:2] == [1.0, 0.0] and truth[-1] == 0.0
    perfect = value_eval.value_accuracy([np.array(truth) * 0.8 + 0.1], [truth], [wrong])
    assert perfect["step_accuracy"] == 1.0 and perfect["final_accuracy"] == 1.0
    flipped = value_eval.value_accuracy([1 - np.array(truth)], [truth], [wrong])
    assert flipped["step_accuracy"] == 0.0 and flipped["num_steps"] == n - 1


def _row(draft_ok, draft_orm, global_ok=False, global_orm=0.0, local_ok=False, local_orm=0.0,
         samples=((False, 0.0),) * 3):
    return {"correct": {"draft": draft_ok, "global": global_ok, "local": local_ok},
            "orm": {"draft": draft_orm, "global": global_orm, "local": local_orm},
            "samples": ["s"] * len(samples), "samples_correct": [c for c, _ in samples],
            "samples_orm": [o for _, o in samples]}


def test_outcomes_gate_rerank_and_the_like_for_like_baseline():
    rows = [_row(False, 0.2, global_ok=True, global_orm=0.7, samples=((True, 0.9), (False, 0.1), (True, 0.3))),
            _row(True, 0.8, local_ok=False, local_orm=0.9, samples=((False, 0.5), (False, 0.6), (True, 0.95)))]
    acc = inference.outcomes(rows, orm_threshold=0.5)
    assert acc["greedy"] == [False, True]
    assert acc["best_of_3"] == [True, True]          # highest ORM sample: 0.9 (right), 0.95 (right)
    # draft + first 2 samples: row 0 picks sample 0 (0.9, right); row 1 the draft (0.8 beats 0.5, 0.6)
    assert acc["greedy_plus_2"] == [True, True]
    assert acc["glore"] == [True, True]              # row 1 is not refined: 0.8 >= 0.5
    assert inference.outcomes(rows, orm_threshold=0.85)["glore"] == [True, False]   # local 0.9 outranks
    assert acc["oracle_any"] == [True, True]


def test_threshold_calibration_maximises_validation_glore_accuracy():
    # Refining helps drafts scored 0.1 and 0.3 (wrong, fixed) and hurts the one at 0.6 (right, broken).
    rows = [_row(False, 0.1, global_ok=True, global_orm=0.9), _row(False, 0.3, global_ok=True, global_orm=0.9),
            _row(True, 0.6, global_ok=False, global_orm=0.9), _row(True, 0.95)]
    assert inference.calibrate_threshold(rows) == pytest.approx(0.45)   # midpoint of 0.3 and 0.6
    assert inference.calibrate_threshold([_row(True, 0.5), _row(True, 0.7)]) == 0.0   # never refine
    s = inference.summarize(rows, 0.45)
    assert s["refine_rate"] == 0.5 and s["glore"] == 1.0 and s["greedy"] == 0.5
    # fix/break rates compare every refinement with its draft, gated or not: both right drafts are broken
    assert s["global_counts"] == {"fixed": 2, "wrong_drafts": 2, "broke": 2, "right_drafts": 2}
    assert s["ci95"]["greedy"][0] < 0.5 < s["ci95"]["greedy"][1]


def test_refiners_are_compared_with_a_fresh_sample_and_the_rerank_with_its_auroc():
    # Row 0: wrong draft, sample 0 right (a resample fixes it); row 1: right draft, sample 0 wrong
    # (a resample breaks it); rows 2-3: sample 0 agrees with the draft.
    # Samples 1 and 2 disagree with sample 0, so reading another sample changes every count.
    rows = [_row(False, 0.2, global_ok=True, global_orm=0.9, samples=((True, 0.5), (False, 0.5), (False, 0.5))),
            _row(True, 0.9, global_ok=False, global_orm=0.1, samples=((False, 0.5), (True, 0.5), (True, 0.5))),
            _row(False, 0.3, global_ok=False, global_orm=0.4, samples=((False, 0.5),) * 3),
            _row(True, 0.8, global_ok=True, global_orm=0.3, samples=((True, 0.5),) * 3)]
    s = inference.summarize(rows, 0.5)
    assert s["resample_counts"] == {"fixed": 1, "wrong_drafts": 2, "broke": 1, "right_drafts": 2}
    assert s["resample_fixed_wrong"] == 0.5 and s["resample_broke_right"] == 0.5
    auc = s["orm_candidate_auroc"]
    assert auc["draft"] == 1.0                      # right drafts 0.9, 0.8 above wrong 0.2, 0.3
    assert auc["global"] == 0.75                    # right 0.9, 0.3 vs wrong 0.1, 0.4: 3 of 4 pairs ordered
    assert np.isnan(auc["local"])                   # every local refinement wrong: undefined


def test_where_accuracy_and_label_quality_against_exact_truth():
    truths = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]                 # first wrong: 1, 2, none (ignored)
    probs = [np.array([0.9, 0.2, 0.1]), np.array([0.3, 0.8, 0.1]), np.array([0.9, 0.9, 0.9])]
    assert value_eval.where_accuracy(probs, truths, 0.5) == 0.5   # finds 1; locates 0 instead of 2
    labels = [[1, 1, 0], [1, 0, -1], [1, 1, 1]]
    q = value_eval.label_quality(labels, truths)
    # 7 scored labels: TP = 1+1+3 = 5, FP = 1 (pos 1 of row 0), FN = 1 (pos 1 of row 1), TN = 1
    assert q["precision"] == pytest.approx(5 / 6) and q["recall"] == pytest.approx(5 / 6)
    assert q["accuracy"] == pytest.approx(6 / 8) and q["labels"] == 8


def _seed_run(root, seed, rows, threshold):
    """A finished run's two files `recipe.seeds` reads: report.json and the inference rows."""
    os.makedirs(os.path.join(root, "stages", "inference"))
    with open(os.path.join(root, "stages", "inference", "test_rows.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    results = {**inference.summarize(rows, threshold),
               **{f"{m}_{k}": 0.5 for m in ("orm", "sorm") for k in seeds.VALUE_KEYS}}
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump({"seed": seed, "num_test": len(rows), "results": results, "timings": {"a": 60.0}}, f)
    return str(root)


def test_seeds_pool_questions_across_runs_and_table_the_refiners(tmp_path):
    # Seed 0: GLoRe fixes row 0's wrong draft. Seed 1: GLoRe breaks row 1's right draft.
    fix = [_row(False, 0.2, global_ok=True, global_orm=0.9, samples=((True, 0.1),) * 3),
           _row(True, 0.9, samples=((True, 0.1),) * 3)]
    brk = [_row(False, 0.9), _row(True, 0.2, global_orm=0.9, samples=((False, 0.1),) * 3)]
    dirs = [_seed_run(tmp_path / "s0", 0, fix, 0.5), _seed_run(tmp_path / "s1", 1, brk, 0.5)]
    agg = seeds.aggregate(dirs)
    assert agg["rows"]["greedy"]["per_seed"] == [0.5, 0.5]
    assert agg["rows"]["glore"]["per_seed"] == [1.0, 0.0]
    # Pooled over the 4 (seed, question) pairs: one win and one loss for GLoRe, so p = 1.
    assert agg["pooled_p"]["glore_vs_greedy"] == 1.0
    assert agg["pooled_p_vs_greedy"]["glore"] == 1.0 and "greedy" not in agg["pooled_p_vs_greedy"]
    # best of 3: seed 0 keeps row 0 right (sample right) and row 1 right; seed 1 loses row 1 -> 1 win, 1 loss
    assert agg["pooled_p_vs_greedy"]["best_of_3"] == 1.0
    assert agg["refiners"]["global_fixed_wrong"] == [1.0, 0.0]
    assert agg["refiners"]["resample_fixed_wrong"] == [1.0, 0.0]
    assert agg["refiners"]["resample_broke_right"] == [0.0, 1.0]
    assert agg["gate"]["refine_rate"] == [0.5, 0.5]
    md = seeds.markdown(agg)
    assert "| resample (fresh T sample) | 100.0 / 0.0 | 0.0 / 100.0 | 50.0 / 50.0 (mean) |" in md
    assert "Wall-clock minutes per seed: 1.0, 1.0" in md
    assert "| Global + local, ORM-gated + rerank (GLoRe) | 100.0 | 0.0 | 50.0 (" in md and ") | 1 |" in md


def test_seeds_test_every_row_against_greedy_on_its_own_outcomes(tmp_path):
    # Four wrong drafts that the global refiner fixes, two right ones kept: GLoRe wins 4 discordant
    # pairs (exact p = 2 * 0.5**4), while best of 3 equals greedy question by question (p = 1).
    rows = [_row(False, 0.2, global_ok=True, global_orm=0.9)] * 4 + [_row(True, 0.9, samples=((True, 0.1),) * 3)] * 2
    agg = seeds.aggregate([_seed_run(tmp_path / "s0", 0, rows, 0.5)])
    assert agg["pooled_p_vs_greedy"]["glore"] == 0.125
    assert agg["pooled_p_vs_greedy"]["best_of_3"] == 1.0
    assert "| Global + local, ORM-gated + rerank (GLoRe) | 100.0 |" in seeds.markdown(agg)


def test_refiner_set_is_chosen_on_validation_and_ties_go_to_the_papers_set():
    # The local refiner breaks the right draft at 0.4 (its 0.9 outranks the draft), the global one
    # fixes the wrong drafts at 0.2 and 0.5: no gate lets global + local fix 0.5 without breaking
    # 0.4, so global alone wins, with its own gate above 0.5.
    rows = [_row(False, 0.2, global_ok=True, global_orm=0.8, local_orm=0.1),
            _row(True, 0.4, global_ok=True, global_orm=0.3, local_ok=False, local_orm=0.9),
            _row(False, 0.5, global_ok=True, global_orm=0.8, local_orm=0.1),
            _row(True, 0.9)]
    assert inference.calibrate_refiners(rows) == ("global", pytest.approx(0.7))
    assert inference.calibrate_threshold(rows) == pytest.approx(0.3)      # 3 of 4 at best, lowest gate
    acc = inference.outcomes(rows, 0.3, ("global", 0.7))
    assert acc["glore_val_set"] == [True, True, True, True] and acc["glore"] == [True, True, False, True]
    assert inference.outcomes(rows, 0.7)["glore"] == [True, False, True, True]     # local 0.9 outranks, breaks
    assert "glore_val_set" not in inference.outcomes(rows, 0.3)
    s = inference.summarize(rows, 0.3, ("global", 0.7))
    assert s["val_refiner_set"] == "global" and s["glore_val_set"] == 1.0 and s["glore"] == 0.75
    # Equal accuracy: the paper's global + local is kept.
    assert inference.calibrate_refiners([_row(False, 0.2, global_ok=True, global_orm=0.8, local_ok=True,
                                              local_orm=0.7), _row(True, 0.9)])[0] == "global+local"


class _ScriptedRefiner:
    """A Generator stand-in: answers each prompt by what its decoded text contains (greedy, one completion)."""

    def __init__(self, tok, answer):
        self.tokenizer, self.answer, self.prompts = tok, answer, []

    def complete(self, ids, k=1, **_):
        texts = [self.tokenizer.decode(p) for p in ids]
        self.prompts += texts
        return [[self.answer(self.tokenizer, t)] * k for t in texts]


class _FixedSorm:
    def __init__(self, values):
        self.values = values

    def step_probs(self, items):
        return [np.asarray(self.values[q]) for q, _ in items]


def test_rerank_candidates_are_graded_refinements_marked_where_the_sorm_drops(tmp_path, shared_dir):
    """The rerank ORM's data: each draft refined globally and locally (marked at the SORM's first value
    under the threshold), graded against gold, then the replayed ORM records."""
    import types

    from glore_jax.recipe import stages
    tok = Tokenizer.load(shared_dir / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model")
    drafts = [{"question": "q1", "gold": "10", "solution": "a = 1\nb = 2\nc = 3\n#### 7", "correct": False},
              {"question": "q2", "gold": "4", "solution": "x = 1\ny = 3\n#### 4", "correct": True}]
    glob = _ScriptedRefiner(tok, lambda t, p: "z = 9\n#### 10" if "q1" in p else "#### 5")
    local = _ScriptedRefiner(tok, lambda t, p: "b = 4\n#### 10" if "q1" in p else "y = 3\n#### 4")
    sorm = _FixedSorm({"q1": [0.9, 0.3, 0.2, 0.1], "q2": [0.8, 0.7, 0.6]})
    ctx = types.SimpleNamespace(generator=lambda m: m, scorer=lambda m: m,
                                g=types.SimpleNamespace(sorm_threshold=0.5, shard_size=1))
    replay = [{"question": "q3", "gold": "1", "solution": "#### 1", "correct": True}]
    out = stages.refinement_candidates(ctx, {"global_refiner": glob, "local_refiner": local, "sorm": sorm},
                                       drafts, str(tmp_path), replay, sorm_threshold=0.5)
    by = {(r["source"], r["question"]): r for r in out}
    assert len(out) == 5 and by[("replay", "q3")]["correct"] is True
    assert by[("global", "q1")]["correct"] is True and by[("global", "q2")]["correct"] is False
    # q1: first value under 0.5 is step 1, so the draft's step 0 is kept and the fix continues from there.
    assert by[("local", "q1")]["solution"] == "a = 1\nb = 4\n#### 10" and by[("local", "q1")]["correct"] is True
    # q2: no value under 0.5, so the lowest (the final line, index 2) is marked; both steps are kept.
    assert by[("local", "q2")]["solution"] == "x = 1\ny = 3\ny = 3\n#### 4"
    assert all(r["draft_correct"] == d["correct"] for d in drafts for r in out
               if r["question"] == d["question"] and r["source"] != "replay")
    marked = {p.split("[DRAFT]")[0]: p.split("[DRAFT]")[1] for p in local.prompts}
    assert marked["q1"].replace(" ", "").startswith("a=1\n[BAD]b=2"), marked["q1"]
    assert marked["q2"].replace(" ", "").startswith("x=1\ny=3\n[BAD]####4"), marked["q2"]
    assert len(list(tmp_path.glob("shard_*.jsonl"))) == 2  # resumable: one shard per draft here


def test_sorm_minus_orm_gaps_agree_with_each_models_measures_and_a_hand_case():
    # Synthetic truth for 3 solutions of 2 questions: steps then the final line (2 steps each here).
    sols = ["a = 1\nb = 2\n#### 3", "a = 1\nb = 5\n#### 6", "a = 2\nb = 3\n#### 5"]
    truths = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    clusters = [0, 0, 1]
    exact = [np.asarray(t) for t in truths]               # a SORM that reads the truth
    flat = [np.full(3, 0.6) for _ in truths]              # an ORM that says the same everywhere
    gaps = value_eval.compare(flat, exact, truths, sols, clusters, resamples=200)
    # Steps: positives 3, negatives 3. Exact AUROC 1, constant 0.5 -> +0.5. Where: the exact model finds both
    # first wrong steps; the constant is never below 0.5, so its locator takes the lowest value, the first
    # position: right for question 1's solution (wrong from step 0), not for question 0's -> +0.5.
    assert gaps["step_auroc"]["diff"] == pytest.approx(0.5) and gaps["where_accuracy"]["diff"] == pytest.approx(0.5)
    # Resampling the 2 questions: {0,0} -> +1, {1,1} -> 0, mixed -> +0.5; a quarter at 0 gives p ~ 0.5.
    assert gaps["where_accuracy"]["ci95"] == [0.0, 1.0] and 0.3 < gaps["where_accuracy"]["p"] < 0.7
    rng = np.random.default_rng(0)
    a, b = ([rng.random(3) for _ in truths] for _ in range(2))
    gaps = value_eval.compare(a, b, truths, sols, clusters, resamples=50)
    va, vb = (value_eval.value_accuracy(p, truths, sols) for p in (a, b))
    assert gaps["step_auroc"]["diff"] == pytest.approx(vb["step_auroc"] - va["step_auroc"])
    assert gaps["where_accuracy"]["diff"] == pytest.approx(vb["where_accuracy"] - va["where_accuracy"])
    with pytest.raises(ValueError, match="one entry per solution"):
        value_eval.compare(a, b, truths, sols, clusters[:2])


def test_locator_threshold_is_chosen_for_where_accuracy_on_a_hand_case():
    sols = ["a = 1\nb = 2\n#### 3"] * 4                     # 2 steps + the final line: 3 positions
    truths = [[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]]    # first wrong: 1, 2, 0, none (not counted)
    probs = [np.array(p) for p in ([0.9, 0.6, 0.1], [0.9, 0.7, 0.2], [0.55, 0.3, 0.2], [0.9, 0.9, 0.9])]
    # At 0.5 the locator picks 2, 2, 1: one hit. Row 0 needs 0.6 < t <= 0.9, row 1 0.2 < t <= 0.7, row 2
    # t > 0.55: all three on (0.6, 0.7], grid points 0.65 and 0.70; the tie goes to the one nearer 0.5.
    threshold, curve = value_eval.calibrate_locator(probs, truths)
    assert threshold == 0.65 and curve["0.65"] == curve["0.70"] == 1.0
    assert curve["0.50"] == pytest.approx(1 / 3) and curve["0.60"] == pytest.approx(2 / 3)
    acc = value_eval.value_accuracy(probs, truths, sols, where_threshold=threshold)
    assert acc["where_accuracy"] == 1.0 and acc["where_accuracy_at_half"] == pytest.approx(1 / 3)
    assert acc["step_accuracy"] == value_eval.value_accuracy(probs, truths, sols)["step_accuracy"]  # 0.5 stays
    # compare() reads each model at its own threshold: the same probs, b at 0.65, a at 0.5.
    gaps = value_eval.compare(probs, probs, truths, sols, [0, 1, 2, 3], threshold=0.5, threshold_b=0.65, resamples=20)
    assert gaps["where_accuracy"]["diff"] == pytest.approx(2 / 3) and gaps["step_auroc"]["diff"] == 0.0
    # No wrong solution to learn from: 0.5.
    assert value_eval.calibrate_locator([np.array([0.9, 0.9])], [[1, 1]])[0] == 0.5


def test_locator_thresholds_are_calibrated_on_validation_questions_only(tmp_path):
    """The `locate` stage samples the policy on the validation questions (a test question would raise),
    scores the samples with both value models against exact truth, and picks each model's threshold."""
    import random
    import types

    from glore_jax.recipe import stages
    from glore_jax.tasks import SyntheticConfig, generate_split, inject_error
    val = list(generate_split(SyntheticConfig(train_size=6, test_size=3, min_steps=3, max_steps=3), "train"))
    test = list(generate_split(SyntheticConfig(train_size=6, test_size=3, min_steps=3, max_steps=3), "test"))
    wrong_at_1 = {r["question"]: inject_error(json.loads(r["meta"]), 1, "arithmetic", random.Random(0)) for r in val}
    asked = []

    class Policy:
        def complete(self, prompt_list, k=1, temperature=0.0, seed=0):
            asked.extend(prompt_list)
            return [[wrong_at_1[q]] * k for q in prompt_list]       # KeyError on any test question

    class Scorer:
        def __init__(self, values):
            self.values = values

        def step_probs(self, items):
            return [np.asarray(self.values[:prompts.num_scorable_positions(s)]) for _, s in items]

    scorers = {"sorm": Scorer([0.9, 0.6, 0.3, 0.2, 0.1]), "orm": Scorer([0.4] * 5)}
    g = types.SimpleNamespace(sorm_threshold=-1.0, value_eval_k=2, temperature=0.7, shard_size=4)
    ctx = types.SimpleNamespace(g=g, task="synthetic", seed=0, val=val, test=test, generator=lambda m: m,
                                scorer=lambda name: scorers[name], policy_prompts=lambda qs: list(qs))
    out = stages.locate_thresholds(ctx, {"policy": Policy(), "orm": "orm", "sorm": "sorm"}, str(tmp_path))
    assert sorted(asked) == sorted(r["question"] for r in val) and not set(asked) & {r["question"] for r in test}
    # SORM: the first value under t is step 1 (the first wrong step) for 0.6 < t <= 0.9 -> 0.65. The ORM is
    # flat (every t finds step 0, never right), so it keeps 0.5.
    assert out["sorm"] == 0.65 and out["orm"] == 0.5 and out["calibrated"] is True
    assert out["val_where_accuracy"]["sorm"]["0.65"] == 1.0 and out["val_where_accuracy"]["sorm"]["0.50"] == 0.0
    g.sorm_threshold = 0.4     # fixed: both models, nothing sampled
    asked.clear()
    assert stages.locate_thresholds(ctx, {"policy": Policy()}, str(tmp_path / "fixed")) == {
        "orm": 0.4, "sorm": 0.4, "calibrated": False} and not asked
    # value_eval classifies steps at a configured threshold (0.5 when locate calibrates) and reads
    # where-accuracy at each model's own threshold. SORM: [0.9, 0.6, 0.3] against truth [1, 0, 0].
    g.value_eval_split, g.test_questions = "val", 0
    models = {"policy": Policy(), "orm": "orm", "sorm": "sorm"}
    for fixed, step_accuracy in ((0.7, 1.0), (-1.0, 2 / 3)):
        g.sorm_threshold = fixed
        evals, _, _ = stages.value_evaluation(ctx, models, str(tmp_path / f"eval{fixed}"), {"orm": 0.5, "sorm": 0.65})
        assert evals["sorm"]["step_accuracy"] == pytest.approx(step_accuracy), fixed
        assert evals["sorm"]["where_accuracy"] == 1.0 and evals["orm"]["where_accuracy"] == 0.0


def test_report_says_where_accuracy_is_optimistic_when_read_on_the_calibration_questions():
    from glore_jax.recipe import report
    rep = {"results": {"greedy": 0.5}, "value_eval_split": "val", "stages": {"locate": {"calibrated": True}}}
    assert "optimistic" in report.markdown(rep)
    for split, calibrated in (("test", True), ("val", False)):
        rep.update(value_eval_split=split, stages={"locate": {"calibrated": calibrated}})
        assert "optimistic" not in report.markdown(rep)
