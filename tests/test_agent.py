"""RefineRL: the program task, the tools' reports, the agent trace format, multi-turn episodes and the
`refinerl` objective in the loop (kill -9 and exact resume)."""

import json
import random

import jax
import numpy as np
import pytest

from glore_jax import prompts
from glore_jax.agent import AgentConfig, AnnotationTool, EpisodeShape, ProgramTool, episode_metrics, run_episodes
from glore_jax.agent.episodes import Check, Episode, turn_counts
from glore_jax.agent.tools import SKEPTIC, annotation_report, program_report
from glore_jax.errors import ConfigError
from glore_jax.execution import run_many
from glore_jax.prompts import agent_formats
from glore_jax.tasks.programs import ProgramConfig, evaluate, generate_split, mutate, render_program
from glore_jax.tokenizer import train_tokenizer
from tests.test_onpolicy import _job, _metrics, _metrics_or_empty, kill_after_a_checkpoint

SMALL = ProgramConfig(train_size=120, test_size=40, seed=5, max_clauses=3)


@pytest.fixture(scope="module")
def program_records():
    return list(generate_split(SMALL, "train")), list(generate_split(SMALL, "test"))


@pytest.fixture(scope="module")
def program_tok(tmp_path_factory, program_records):
    path = tmp_path_factory.mktemp("ptok") / "programs.model"
    train, _ = program_records
    texts = [t for r in train for t in (r["question"], r["answer"], agent_formats.refinement_text(r))]
    return train_tokenizer(texts + [ProgramTool.trace_report(json.loads(train[0]["meta"]), json.loads(train[0]["meta"]))],
                           600, path)


def _meta(r):
    return json.loads(r["meta"])


def test_reference_programs_pass_their_tests_in_the_sandbox(program_records):
    """The data's expected outputs come from the trusted interpreter; executing the rendered reference
    program must agree on every public and hidden test."""
    train, test = program_records
    sample = train[:30] + test[:10]
    reports = run_many([(r["answer"], "f", [([a], o) for a, o in _meta(r)["public"] + _meta(r)["hidden"]])
                        for r in sample])
    assert all(rep.all_passed for rep in reports), [r.verdicts for r in reports if not r.all_passed][:3]
    assert {_meta(r)["kind"] for r in sample} == {"scalar", "list"}


def test_splits_are_deterministic_disjoint_and_hidden_tests_hold_every_boundary(program_records):
    train, test = program_records
    assert list(generate_split(SMALL, "test")) == test
    structure = lambda r: json.dumps({k: v for k, v in _meta(r).items() if k not in ("public", "hidden")},  # noqa: E731
                                     sort_keys=True)
    assert not {structure(r) for r in train} & {structure(r) for r in test}
    for r in train:
        meta = _meta(r)
        assert len(meta["public"]) == SMALL.public_tests and len(meta["hidden"]) == SMALL.hidden_tests
        assert r["question"].count("f(") == 1 + SMALL.public_tests and json.loads(r["gold"]) == meta["hidden"]
        if meta["kind"] == "scalar":
            assert len({a for a, _ in meta["public"]}) == SMALL.public_tests   # no repeated example
            for b in meta["branches"]:
                if b["if"]["kind"] in ("gt", "ge", "lt", "le"):
                    a = b["if"]["a"]
                    assert {a - 1, a, a + 1} & set(range(SMALL.max_input + 1)) <= {x for x, _ in meta["hidden"]} or \
                        len(meta["hidden"]) < 3 * len(meta["branches"])


def test_mutants_change_the_function_and_some_pass_every_public_test(program_records):
    train, _ = program_records
    rng = random.Random(0)
    hidden_only = 0
    for r in train:
        meta = _meta(r)
        bug = mutate(meta, rng)
        if bug is None:
            continue
        outs = [(evaluate(bug, a) == o) for a, o in meta["public"] + meta["hidden"]]
        assert not all(outs)
        hidden_only += all(outs[:len(meta["public"])])
        assert render_program(bug) != r["answer"]
    assert hidden_only > 0   # the bugs a skeptical turn is for exist in the data


def test_config_errors_are_one_line():
    for bad in (dict(min_clauses=2, max_clauses=1), dict(max_const=2), dict(list_share=1.5), dict(hidden_tests=0)):
        with pytest.raises(ConfigError):
            ProgramConfig(**bad)
    with pytest.raises(ConfigError, match="agent.reward"):
        AgentConfig(reward="partial").check()
    with pytest.raises(ConfigError, match="agent.turns"):
        AgentConfig(turns=0).check()


def test_reports_quote_failures_and_stay_skeptical_on_a_pass(program_records):
    train, _ = program_records
    meta = _meta(train[0])
    public = meta["public"]
    ok = program_report(public, ["pass"] * len(public), [o for _, o in public])
    assert ok.startswith(f"Public tests: {len(public)}/{len(public)} passed.") and SKEPTIC in ok
    wrong = program_report(public, ["wrong_answer", "error:ZeroDivisionError", "pass"], [99, None, public[2][1]])
    assert f"f({json.dumps(public[0][0])}) returned 99, expected {public[0][1]}." in wrong
    assert "gave error ZeroDivisionError" in wrong and "1/3 passed" in wrong and SKEPTIC not in wrong
    assert "refused (import)" in program_report(public, ["refused:import"] * 3, [None] * 3)


def test_trace_reports_are_the_sandbox_reports(program_records):
    """The SFT trace's words for a planted bug (from the trusted interpreter) equal what the sandbox says
    when the buggy program really runs: the policy is trained on the observations it will see."""
    train, _ = program_records
    rng = random.Random(1)
    tool = ProgramTool()
    records, texts, expected = [], [], []
    for r in train[:25]:
        bug = mutate(_meta(r), rng)
        if bug is not None:
            records.append(r)
            texts.append(render_program(bug))
            expected.append(ProgramTool.trace_report(_meta(r), bug))
    checks = tool.check(records, texts)
    assert [c.report for c in checks] == expected
    assert not any(c.solved for c in checks) and all(c.reward == 0.0 for c in checks)
    right = tool.check(records[:3], [r["answer"] for r in records[:3]])
    assert all(c.solved and c.public_ok and c.reward == 1.0 for c in right)
    fraction = ProgramTool(reward="fraction").check(records, texts)
    assert all(0.0 <= c.reward < 1.0 for c in fraction) and any(c.reward > 0 for c in fraction)
    hostile = tool.check(records[:1], ["import os\ndef f(x):\n    return os.getcwd()"])[0]
    assert not hostile.public_ok and hostile.reward == 0.0 and "refused" in hostile.report


def test_annotation_tool_recomputes_calculations_and_grades_the_answer(task_records):
    from glore_jax.tasks import inject_error
    r = task_records[0]
    meta = json.loads(r["meta"])
    right = AnnotationTool().check([r], [r["answer"]])[0]
    assert right.public_ok and right.solved and SKEPTIC in right.report
    wrong = inject_error(meta, 0, "arithmetic", random.Random(0))
    check = AnnotationTool().check([r], [wrong])[0]
    assert not check.public_ok and not check.solved and "Step 1:" in check.report
    carried = inject_error(meta, 0, "carry", random.Random(0))   # consistent arithmetic from a wrong value
    assert annotation_report(carried)[1] and not AnnotationTool().check([r], [carried])[0].solved
    assert not annotation_report("no steps here")[1]


def test_agent_trace_masks_the_bug_and_the_report(program_records, program_tok):
    train, _ = program_records
    tok = program_tok
    fix = tok.control_id("[FIX]")
    kinds = set()
    for r in train[:40]:
        attempt, report, right = agent_formats.first_attempt(r)
        ex = prompts.Renderer("agent", tok)(r)
        tokens, loss = list(ex.tokens), ex.loss_mask
        p = len(prompts.policy_prompt(tok, r["question"]))
        first_end = p + len(tok.encode(attempt)) + 1
        fix_at = tokens.index(fix)
        assert tokens[first_end - 1] == tok.eos_id and tokens[first_end:fix_at] == tok.encode(report)
        assert loss[:p].sum() == 0 and loss[first_end:fix_at + 1].sum() == 0   # prompt and observation: no loss
        assert loss[p:first_end].min() == loss[p:first_end].max() == float(right)
        assert loss[fix_at + 1:].min() == 1.0
        second = tok.decode(tokens[fix_at + 1:-1])
        assert second.startswith("# check:") and second.endswith(r["answer"])
        kinds.add(right)
        if not right:
            assert attempt != r["answer"]
    assert kinds == {True, False}


class _Scripted:
    """A tool that passes the public checks of even-numbered problems only; hidden: never solved."""

    def __init__(self):
        self.calls = []

    def check(self, records, texts):
        self.calls.append(len(texts))
        even = [int(r["id"][-1]) % 2 == 0 for r in records]
        return [Check(report="ok" if e else "Public tests: 0/3 passed. f(1) returned 2, expected 3.", public_ok=e,
                      reward=0.0, solved=False)
                for e in even]


def test_episodes_append_observations_and_keep_sampled_spans(program_records, program_tok, one_device):
    from glore_jax import models
    tok = program_tok
    _, test = program_records
    config = models.preset("tiny", vocab_size=-(-tok.vocab_size // 128) * 128)
    params = models.init_params(config, jax.random.key(0))
    shape = EpisodeShape(turns=3, max_prompt_len=96, max_new_tokens=12, max_obs_tokens=10)
    tool = _Scripted()
    eps = run_episodes(config, params, tok, test[:4], tool, one_device, shape, k=2, temperature=1.0, seed=3)
    assert len(eps) == 8 and tool.calls == [8, 8, 8]
    for ep in eps:
        assert len(ep.spans) == len(ep.texts) == len(ep.checks) == 3 and len(ep.tokens) <= shape.width
        for (s0, e0), (s1, _) in zip(ep.spans, ep.spans[1:]):
            closed = ep.tokens[s0:e0] if ep.tokens[e0 - 1] == tok.eos_id else ep.tokens[s0:e0] + [tok.eos_id]
            obs = agent_formats.observation(tok, ep.checks[0].report if s0 == ep.spans[0][0] else ep.checks[1].report,
                                            shape.max_obs_tokens)
            assert ep.tokens[s0:s1] == closed + obs   # attempt, EOS, report, [FIX]: the next turn's prompt
        # A report longer than max_obs_tokens is cut, and counted: the SFT traces never show a cut one.
        assert ep.obs_cut == sum(len(tok.encode(c.report)) + 1 > shape.max_obs_tokens for c in ep.checks[:2])
    assert 0 < sum(ep.obs_cut for ep in eps) < 2 * len(eps)
    plain = run_episodes(config, params, tok, test[:4], _Scripted(), one_device, shape, k=2, temperature=1.0,
                         seed=3, skeptical=False)
    assert [len(ep.texts) for ep in plain] == [1, 1, 3, 3] * 2   # without skepticism a public pass ends it


def _ep(texts, solved, public):
    return Episode(record={}, tokens=[], spans=[], texts=texts, stopped=[True] * len(texts),
                   checks=[Check(report="", public_ok=p, reward=float(s), solved=s) for s, p in zip(solved, public)])


def test_turn_counts_tell_fixes_from_breaks():
    fixed = _ep(["def f(x):\n    return x", "# check: x\ndef f(x):\n    return x + 1"], [False, True], [True, True])
    kept = _ep(["def f(x):\n    return x", "# check: none\ndef f(x):\n    return x"], [True, True], [True, True])
    broke = _ep(["def f(x):\n    return x", "def f(x):\n    return 0"], [True, False], [True, False])
    failing = _ep(["def f(x):\n    return 1", "def f(x):\n    return 0"], [False, False], [False, False])
    assert turn_counts(fixed) == {"passing_turns": 1, "changed_passing": 1, "fixed": 1, "broke": 0}
    assert turn_counts(kept) == {"passing_turns": 1, "changed_passing": 0, "fixed": 0, "broke": 0}
    assert turn_counts(broke)["broke"] == 1 and turn_counts(failing)["passing_turns"] == 0
    m = episode_metrics([fixed, kept, broke, failing])
    assert (m["pass1_first"], m["pass1_final"], m["changed_passing"]) == (0.5, 0.5, 2 / 3)


def test_refinerl_masks_observations_logs_and_resumes_exactly_after_kill_9(warm_policy, tmp_path):
    """Two-turn episodes on the arithmetic task (the annotation tool): the loop's batch carries loss on
    sampled tokens only, the metrics are logged, and a killed run resumes to the same numbers."""
    tok, policy = warm_policy
    steps = 6
    out, _ = _job(tmp_path / "straight", tok, policy, steps, "refinerl").communicate(timeout=600)
    assert '"finished": 6' in out, out[-3000:]
    straight = _metrics(tmp_path / "straight")
    assert [r["step"] for r in straight] == list(range(1, steps + 1))
    for key in ("reward", "accuracy", "correct_t1", "public_t1", "changed_passing", "fixed", "broke", "turns",
                "tool_share", "kl"):
        assert key in straight[-1], key
    assert all(r["turns"] == 2.0 for r in straight)
    killed = tmp_path / "killed"
    assert 2 <= kill_after_a_checkpoint(_job(killed, tok, policy, steps, "refinerl"), killed, rows=3) < steps
    assert len(_metrics_or_empty(killed)) < steps
    out, _ = _job(killed, tok, policy, steps, "refinerl").communicate(timeout=600)
    assert '"finished": 6' in out, out[-3000:]
    for a, b in zip(straight, _metrics(killed)):
        assert (a["loss"], a["reward"], a["correct_t1"], a["kl"]) == (b["loss"], b["reward"], b["correct_t1"], b["kl"])


def test_rollout_batch_masks_every_observation_token(warm_policy):
    from glore_jax.agent.rollouts import AgentRollouts
    from glore_jax.tasks import generate_split
    from tests import onpolicy
    from tests.test_latro import _run
    run, params = _run(warm_policy)
    run.exp = run.exp.replace(objective="refinerl")
    source = AgentRollouts(run, run.exp.rl, run.exp.agent, list(generate_split(onpolicy.TASK, "train")), seed=0)
    batch = source._sample(params, jax.random.key(0))
    fix = run.tokenizer.control_id("[FIX]")
    for row in range(batch["tokens"].shape[0]):
        turns, tokens = batch["turn_ids"][row], batch["tokens"][row]
        assert set(np.unique(turns)) <= {0, 1, 2} and (batch["loss_mask"][row] == (turns > 0)).all()
        assert (turns[tokens == fix] == 0).all() and (tokens == fix).sum() == 1   # observations carry no loss
        start2 = int(np.argmax(turns == 2)) if (turns == 2).any() else None
        if start2 is not None:
            assert tokens[start2 - 1] == fix and (turns[int(np.argmax(turns == 1)):start2] != 2).all()
    assert batch["advantages"].shape == batch["rewards"].shape


def test_recipe_runs_share_steps_and_start_from_sft(tmp_path):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "refinerl_demo.py"
    spec = importlib.util.spec_from_file_location("refinerl_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from glore_jax.agent.recipe import run_configs
    c = module.get_config()
    runs = run_configs(c)
    assert list(runs) == ["sft", "grpo", "refinerl"]
    assert runs["sft"].objective == "sft" and runs["sft"].data.prompt_format == "agent" and not runs["sft"].init_from
    for name in ("grpo", "refinerl"):
        assert runs[name].objective == "refinerl" and runs[name].init_from == runs["sft"].workdir
        assert runs[name].train.total_steps == c.train.total_steps and runs[name].train.batch_size == c.train.batch_size
    assert (runs["grpo"].agent.turns, runs["refinerl"].agent.turns) == (1, c.agent.turns)
    assert module.get_config("refinerl").agent.skeptical
    bad = module.get_config()
    bad.unlock()
    bad.agent.reward = "partial"
    with pytest.raises(ConfigError, match="agent.reward"):
        run_configs(bad)
