"""GLoRe recipe logic, its training data: SORM step labels (definition, rollouts, checks, balancing) and refinement pairs.

The inference, evaluation and seed tables: `tests/test_recipe_eval.py`.
"""

import pytest

from glore_jax import prompts
from glore_jax.recipe import refine_data, sorm_labels
from glore_jax.tokenizer import Tokenizer

# A hand-built deterministic "policy": the final answers of its K=2 rollouts,
# keyed by (question, number of solution steps in the prefix).
TABLE = {
    ("q1", 0): ["10", "5"], ("q1", 1): ["5", "10"], ("q1", 2): ["5", "5"], ("q1", 3): ["7", "7"],
    ("q2", 0): ["4", "4"], ("q2", 1): ["1", "1"], ("q2", 2): ["4", "1"],
    ("q3", 0): ["1", "1"], ("q3", 1): ["1", "1"], ("q3", 2): ["9", "1"],
}


ITEMS = [("q1", "10", "a = 1\nb = 2\nc = 3\n#### 7"),     # wrong; only the 1-step prefix can recover
         ("q2", "4", "x = 1\ny = 3\n#### 4"),              # right
         ("q3", "9", "p = 1\nq = 2\n#### 2")]              # wrong; recoverable after step 2


def table_policy(queries, k):
    out = []
    for question, prefix in queries:
        n = prefix.count("\n")
        out.append([f"#### {ans}" for ans in TABLE[(question, n)][:k]])
    return out


def test_sorm_labels_follow_the_definition_before_balancing():
    got = sorm_labels.label_solutions(ITEMS, table_policy, sorm_labels.LabelConfig(k=2, balance=False))
    assert [g.raw for g in got] == [[True, False, False], [False, True], [False, True]]
    # any-rollout labels, then monotone: positives propagate backwards; a right answer makes all positive
    assert [g.labels for g in got] == [[1, 0, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert [g.first_negative for g in got] == [1, None, None]   # q3: only its final line is wrong
    assert got[0].verified[1] == [False, True] and got[0].rollouts[1] == ["#### 5", "#### 10"]


def test_sorm_rollouts_are_asked_for_by_steps_left_and_come_back_to_their_own_prefix():
    seen = []

    def echo_policy(queries, k):
        seen.extend(queries)
        return [[f"{question} {prefix.count(chr(10))} #### {i}" for i in range(k)] for question, prefix in queries]

    got = sorm_labels.label_solutions(ITEMS, echo_policy, sorm_labels.LabelConfig(k=2, balance=False))
    # q1 has 3 steps, q2 and q3 have 2: steps left = steps - prefix length, asked for most first.
    left = [{"q1": 3, "q2": 2, "q3": 2}[q] - prefix.count("\n") for q, prefix in seen]
    assert left == sorted(left, reverse=True) and len(seen) == 4 + 3 + 3
    assert seen[0] == ("q1", "")
    for item, labelled in zip(ITEMS, got):
        assert labelled.rollouts == [[f"{item[0]} {j} #### {i}" for i in range(2)]
                                     for j in range(len(labelled.steps) + 1)]


def test_sorm_balancing_equalises_each_index_by_masking_the_majority():
    unbalanced = sorm_labels.label_solutions(ITEMS, table_policy, sorm_labels.LabelConfig(k=2, balance=False))
    for seed in range(5):
        got = sorm_labels.label_solutions(ITEMS, table_policy, sorm_labels.LabelConfig(k=2, seed=seed))
        for index in range(4):
            labels = [g.labels[index] for g in got if index < len(g.labels)]
            before = [u.labels[index] for u in unbalanced if index < len(u.labels)]
            assert labels.count(1.0) == labels.count(0.0)
            majority = 1.0 if before.count(1.0) > before.count(0.0) else 0.0
            for lab, ref in zip(labels, before):
                assert lab == ref or (lab == -1.0 and ref == majority)
        # index 0 is all positive before balancing, so it is entirely masked
        assert all(g.labels[0] == -1.0 for g in got)


def test_intermediate_result_check_rejects_rollouts_that_ignore_the_step():
    items = [("q", "12", "t = <<2+3=5>>5\n#### 1")]

    def policy(queries, k):
        # from the 1-step prefix, one rollout reuses 5, the other solves from scratch
        return [["#### 12", "#### 12"] if p == "" else ["5 + 7 = 12\n#### 12", "6 * 2 = 12\n#### 12"]
                if p.count("\n") == 1 else ["#### 1", "#### 1"] for _, p in queries]
    plain = sorm_labels.label_solutions(items, policy, sorm_labels.LabelConfig(k=2, balance=False))[0]
    checked = sorm_labels.label_solutions(items, policy, sorm_labels.LabelConfig(k=2, balance=False,
                                                                                  check_intermediate=True))[0]
    assert plain.verified[1] == [True, True] and checked.verified[1] == [True, False]
    assert sorm_labels.step_result("Tom has <<40/8=5>>5 left") == "5"


def test_rollout_fn_contract_is_checked():
    with pytest.raises(ValueError, match="2 continuations"):
        sorm_labels.label_solutions(ITEMS, lambda q, k: [["#### 1"]] * len(q), sorm_labels.LabelConfig(k=2))


def test_local_pairs_mark_the_first_negative_step(shared_dir):
    labelled = sorm_labels.label_solutions(ITEMS, table_policy, sorm_labels.LabelConfig(k=2, balance=False))
    pairs, skipped = refine_data.local_pairs(labelled)
    assert skipped["draft_correct"] == 1
    by_q = {p["question"]: p for p in pairs}
    assert by_q["q1"]["bad_step"] == 1 and by_q["q1"]["target"] == "a = 1\n#### 10"
    assert by_q["q3"]["bad_step"] == 2 and by_q["q3"]["target"] == "p = 1\nq = 2\n#### 9"
    assert prompts.local_continuation(by_q["q1"]["target"], 1) == "#### 10"

    tok = Tokenizer.load(shared_dir / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model")
    p = by_q["q1"]
    ids = prompts.local_refiner_prompt(tok, p["question"], p["draft"], p["bad_step"])
    assert ids.count(tok.bad_id) == 1
    cut = ids.index(tok.bad_id)
    draft_start = ids.index(tok.control_id("[DRAFT]")) + 1
    assert tok.decode(ids[draft_start:cut]).strip() == "a = 1"
    assert tok.decode(ids[cut + 1:]).lstrip().startswith("b = 2")
    # the full refined solution keeps the steps before the marker and appends the fix
    assert prompts.splice_local(p["draft"], p["bad_step"], "#### 10") == p["target"]


def test_global_pairs_pair_wrong_with_right_samples_of_the_same_question():
    samples = [("q", "3", ["1+2=3\n#### 3", "1+1=2\n#### 2", "#### 5"]), ("r", "1", ["#### 1"])]
    pairs = refine_data.global_pairs(samples, seed=0)
    assert len(pairs) == 2 and all(p["question"] == "q" for p in pairs)
    assert {p["draft"] for p in pairs} == {"1+1=2\n#### 2", "#### 5"}
    assert all(p["target"] == "1+2=3\n#### 3" for p in pairs)


def test_reference_fallback_supplies_targets_and_is_counted():
    labelled = sorm_labels.label_solutions(ITEMS, lambda q, k: [["#### 0"] * k for _ in q],
                                           sorm_labels.LabelConfig(k=2, balance=False))
    refs = {"q1": "a = 1\nb = 5\nc = 9\n#### 10", "q3": "p = 1\nq = 8\n#### 9"}
    assert refine_data.local_pairs(labelled)[0] == []
    pairs, _ = refine_data.local_pairs(labelled, references=refs)
    by_q = {p["question"]: p for p in pairs}
    # nothing verifies, so every step is negative: the marker goes before step 0 and the target is the reference
    assert by_q["q1"]["bad_step"] == 0 and by_q["q1"]["target"] == refs["q1"] and by_q["q1"]["source"] == "reference"
    g = refine_data.global_pairs([("q1", "10", ["#### 3"])], references=refs)
    assert g == [{"question": "q1", "gold": "10", "draft": "#### 3", "target": refs["q1"], "source": "reference"}]


def test_sorm_subsample_covers_the_questions_with_right_and_wrong_samples():
    # ORM records come grouped by question: 12 questions x 4 samples, the first two of each right.
    records = [{"question": f"q{i}", "gold": "1", "solution": f"s{i}{j}", "correct": j < 2}
               for i in range(12) for j in range(4)]
    got = sorm_labels.subsample(records, 12, seed=0)
    assert len(got) == 12 and len({r["question"] for r in got}) == 12   # a head slice would cover 3
    assert {r["correct"] for r in sorm_labels.subsample(records, 30, seed=0)} == {True, False}
    assert len({r["question"] for r in sorm_labels.subsample(records, 30, seed=0)}) == 12
    assert sorm_labels.subsample(records, 12, seed=0) == got                      # seeded
    assert sorm_labels.subsample(records, 12, seed=1) != got
    assert sorm_labels.subsample(records, 0, seed=0) == records                   # 0 = all


def test_sorm_subsample_draws_the_asked_share_of_wrong_samples_across_questions():
    # 12 questions x 4 samples; question i has i % 4 wrong samples (18 wrong of 48, 37.5%).
    records = [{"question": f"q{i}", "gold": "1", "solution": f"s{i}{j}", "correct": j >= i % 4}
               for i in range(12) for j in range(4)]
    got = sorm_labels.subsample(records, 16, seed=0, wrong_share=0.75)
    assert len(got) == 16 and sum(not r["correct"] for r in got) == 12           # round(16 * 0.75)
    assert len({r["solution"] for r in got}) == 16                                # no record twice
    # the 12 wrong ones spread over the 9 questions that have any (one each, then a second round)
    assert len({r["question"] for r in got if not r["correct"]}) == 9
    # more wrong asked for than exist: all 18, and the rest right
    got = sorm_labels.subsample(records, 24, seed=0, wrong_share=1.0)
    assert sum(not r["correct"] for r in got) == 18 and len(got) == 24
    assert sorm_labels.subsample(records, 16, seed=0, wrong_share=0.0) == sorm_labels.subsample(records, 16, seed=0)


def test_local_pairs_from_rollouts_match_a_hand_computed_case():
    labelled = sorm_labels.label_solutions(ITEMS, table_policy, sorm_labels.LabelConfig(k=2, balance=False))
    # q1: its first negative step is step 1 ("b = 2"): both rollouts of "a = 1\nb = 2" fail ("#### 5"
    # twice, one draft), and the prefix before it, "a = 1", has the verified rollout "#### 10".
    # q2 (right) and q3 (only its final line wrong) have no negative step, so no rollout draft.
    expected = [{"question": "q1", "gold": "10", "draft": "a = 1\nb = 2\n#### 5", "bad_step": 1,
                 "target": "a = 1\n#### 10", "source": "rollout"}]
    assert refine_data.rollout_pairs(labelled) == expected
    pairs, _ = refine_data.local_pairs(labelled, from_rollouts=True)
    assert [p["source"] for p in pairs] == ["rollout"] + ["policy"] * 2           # plus the drafts' own pairs
    assert refine_data.local_pairs(labelled)[0] == pairs[1:]


def test_calculations_hold_reads_every_annotation():
    assert sorm_labels.calculations_hold("a = <<16-12=4>>4\nb = <<4+15=19>>19\n#### 19")
    assert not sorm_labels.calculations_hold("a = <<16-12=4>>4\nb = <<4+15=20>>20\n#### 20")
    assert not sorm_labels.calculations_hold("<<26/3=8>>8")                 # exact: 26/3 is not 8
    assert sorm_labels.calculations_hold("<<5*0.5=2.5>>2.5 and <<1/3*3=1>>1")
    assert sorm_labels.calculations_hold("no annotation #### 3")
    assert sorm_labels.calculations_hold("<<20%*5=1>>1")                  # unreadable: not judged


def test_arithmetic_check_drops_rollouts_that_reach_gold_by_a_second_slip():
    # "a = 16 - 12 = 5" is wrong; both rollouts of the prefix through it reach the gold 19,
    # one by reusing 5 in a false calculation (5 + 15 = 19), one by computing right from 4.
    item = ("q", "19", "a = <<16-12=5>>5\nb = <<5+15=20>>20\n#### 20")
    conts = {0: ["a = <<16-12=4>>4\nb = <<4+15=19>>19\n#### 19"] * 2,
             1: ["b = <<5+15=19>>19\n#### 19", "b = <<4+15=19>>19\n#### 19"],
             2: ["#### 19", "#### 19"]}

    def rollout_fn(queries, k):
        return [conts[prefix.count("\n")][:k] for _, prefix in queries]

    def labelled(**checks):
        return sorm_labels.label_solutions([item], rollout_fn, sorm_labels.LabelConfig(k=2, balance=False, **checks))[0]

    # Without checks, step 0 verifies (either rollout reaches 19). The intermediate check keeps the
    # first rollout (it mentions 5); only the arithmetic check rejects it.
    assert labelled().labels[0] == 1.0
    assert labelled(check_intermediate=True).verified[1] == [True, False]
    checked = labelled(check_intermediate=True, check_arithmetic=True)
    assert checked.verified[1] == [False, False] and checked.labels[0] == 0.0
    assert checked.verified[0] == [True, True]      # the clean fresh solutions still verify
    assert sorm_labels.relabel(checked, True, False)[0] == 1.0 and sorm_labels.relabel(checked, True, True)[0] == 0.0


def test_global_targets_must_compute_right_with_the_arithmetic_check():
    slip, clean = "<<16-12=5>>5\n<<5+15=19>>19\n#### 19", "<<16-12=4>>4\n<<4+15=19>>19\n#### 19"
    groups = [("q", "19", ["#### 7", slip]), ("r", "19", ["#### 7", slip, clean])]
    assert {p["question"] for p in refine_data.global_pairs(groups)} == {"q", "r"}
    pairs = refine_data.global_pairs(groups, check_arithmetic=True)
    assert [(p["question"], p["target"]) for p in pairs] == [("r", clean)]
