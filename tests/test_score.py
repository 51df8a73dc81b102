"""SCoRe: the shaped reward, the self-correction metrics, per-turn advantages and KL weights (hand-computed),
the stage-I gradient of turn 1, and the two-turn episode's layout against the `self_correct` format."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glore_jax import prompts
from glore_jax.errors import ConfigError
from glore_jax.rl import policy_loss, score_shaped_reward, self_correction_metrics, turn_advantages
from glore_jax.rl.score import token_weights


def test_shaped_reward_pays_for_progress_and_charges_for_regress():
    r1 = np.array([0.0, 1.0, 1.0, 0.0])
    r2 = np.array([1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(score_shaped_reward(r1, r2, 10.0), [11.0, -10.0, 1.0, 0.0])
    np.testing.assert_allclose(score_shaped_reward(r1, r2, 0.0), r2)          # alpha 0: the plain turn-2 reward
    assert score_shaped_reward(0.2, 0.7, 2.0) == pytest.approx(0.7 + 2.0 * 0.5)
    # outcomes as given by a grader: bools, lists, jax arrays
    np.testing.assert_allclose(score_shaped_reward([True, False], [False, True], 10.0), [-10.0, 11.0])
    np.testing.assert_allclose(score_shaped_reward(jnp.array([1, 0]) > 0, jnp.array([1, 1]) > 0, 10.0), [1.0, 11.0])


def test_self_correction_metrics_hand_computed():
    # problems: right->right, right->wrong, wrong->right, wrong->wrong, wrong->right
    m = self_correction_metrics([True, True, False, False, False], [True, False, True, False, True])
    assert m == pytest.approx({"acc_t1": 0.4, "acc_t2": 0.6, "delta": 0.2, "delta_i2c": 0.4, "delta_c2i": 0.2})
    assert m["delta"] == pytest.approx(m["delta_i2c"] - m["delta_c2i"])
    with pytest.raises(ValueError, match="one turn-1 and one turn-2"):
        self_correction_metrics([True, False], [True])


def test_turn_advantages_per_stage_hand_computed():
    r1, r2 = [1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]
    a1, a2 = turn_advantages(r1, r2, stage=1, alpha=10.0, group_size=4, estimator="reinforce")
    np.testing.assert_allclose(a1, 0.0)
    np.testing.assert_allclose(a2, [0.5, 0.5, -0.5, -0.5])              # r2 - mean(r2)
    a1, a2 = turn_advantages(r1, r2, stage=2, alpha=10.0, group_size=4, estimator="reinforce")
    # shaped = r2 + 10 (r2 - r1) = [1, 11, 0, -10], mean 0.5; turn 1: r1 + r2 = [2, 1, 0, 1], mean 1
    np.testing.assert_allclose(a2, [0.5, 10.5, -0.5, -10.5])
    np.testing.assert_allclose(a1, [1.0, 0.0, -1.0, 0.0])
    # The literal sum r1 + shaped = [2, 11, 0, -9], mean 1: turn 1 is paid for being wrong (row 2: +10)
    a1, _ = turn_advantages(r1, r2, stage=2, alpha=10.0, group_size=4, estimator="reinforce", turn1_return="shaped")
    np.testing.assert_allclose(a1, [1.0, 10.0, -1.0, -10.0])
    # rloo within two groups of 2: turn 2 of group 2 has shaped [0, -10] -> [10, -10]
    _, a2 = turn_advantages(r1, r2, stage=2, alpha=10.0, group_size=2, estimator="rloo")
    np.testing.assert_allclose(a2, [-10.0, 10.0, 10.0, -10.0])
    with pytest.raises(ConfigError, match="score.stage"):
        turn_advantages(r1, r2, stage=3, alpha=1.0, group_size=2, estimator="rloo")


def test_token_weights_give_each_turn_its_advantage_and_kl_weight():
    turn_ids = jnp.array([[0, 0, 1, 1, 0, 0, 2, 2, 0], [0, 1, 0, 0, 2, 2, 2, 0, 0]])
    a1, a2 = jnp.array([3.0, -1.0]), jnp.array([5.0, 7.0])
    adv, beta = token_weights(turn_ids, a1, a2, stage=1, beta1=0.01, beta2=0.25)
    np.testing.assert_allclose(adv, [[0, 0, 0, 0, 0, 0, 5, 5, 0], [0, 0, 0, 0, 7, 7, 7, 0, 0]])  # no PG on turn 1
    np.testing.assert_allclose(beta, [[0, 0, .25, .25, 0, 0, .01, .01, 0], [0, .25, 0, 0, .01, .01, .01, 0, 0]])
    adv, beta = token_weights(turn_ids, a1, a2, stage=2, beta1=0.01, beta2=0.25)
    np.testing.assert_allclose(adv, [[0, 0, 3, 3, 0, 0, 5, 5, 0], [0, -1, 0, 0, 7, 7, 7, 0, 0]])
    np.testing.assert_allclose(beta, [[0, 0, .01, .01, 0, 0, .01, .01, 0], [0, .01, 0, 0, .01, .01, .01, 0, 0]])


def test_stage_one_turn_one_gradient_is_the_kl_only():
    """Stage I: at the reference (k3's gradient is 0 there) turn-1 tokens get no gradient at all, whatever
    their advantage; away from it, the gradient is beta2 times the KL's. Stage II does train turn 1."""
    turn_ids = jnp.array([[0, 1, 1, 1, 0, 2, 2, 2]])
    mask = (turn_ids > 0).astype(jnp.float32)
    lp = jnp.log(jnp.array([[1.0, .5, .4, .3, 1.0, .6, .2, .7]]))
    a1, a2 = jnp.array([2.0]), jnp.array([1.5])

    def grads(stage, ref):
        adv, beta = token_weights(turn_ids, a1, a2, stage=stage, beta1=0.01, beta2=0.25)
        return jax.grad(lambda x: policy_loss(x, mask, adv, ref_logprobs=ref, beta=beta, kl="k3")[0])(lp)

    g1 = grads(1, lp)
    np.testing.assert_allclose(g1[0, 1:4], 0.0, atol=1e-7)      # no policy-gradient term on turn 1
    assert np.all(np.abs(g1[0, 5:8]) > 0)                        # turn 2 is trained
    shifted = lp - 0.3
    g_far = grads(1, shifted)
    # k3 = e^(ref - lp) - (ref - lp) - 1, so d/dlp = 1 - e^(ref - lp); a token's share of the mean is 1/6
    np.testing.assert_allclose(g_far[0, 1:4], 0.25 * (1 - np.exp(-0.3)) / 6, rtol=1e-5)
    g2 = grads(2, lp)
    np.testing.assert_allclose(g2[0, 1:4], -2.0 / 6, rtol=1e-5)  # stage II: -A1 / n on turn 1


def test_self_correct_format_layout():
    from glore_jax.tokenizer import Tokenizer
    tok = Tokenizer.load(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tokenizers",
                                      "mistral-7b-v0.1", "tokenizer.model"))
    rec = {"question": "Tom has 3 apples and buys 4. How many?", "draft": "3 + 4 = 8\n#### 8",
           "target": "3 + 4 = 7\n#### 7"}
    fmt = prompts.get("self_correct")
    ids = fmt.prompt(tok, rec)
    first = prompts.policy_prompt(tok, rec["question"])
    draft = tok.encode(rec["draft"])
    assert ids == first + draft + [tok.eos_id] + tok.encode(prompts.SELF_CORRECT_INSTRUCTION) + [
        tok.control_id("[SOL]")]
    # A sampled attempt that ended on EOS gives the same prompt (its EOS closes turn 1, once).
    assert prompts.self_correct_prompt(tok, first, draft + [tok.eos_id]) == ids
    ex = fmt.example(tok, rec)
    assert list(ex.tokens[:ex.prompt_len]) == ids and ex.loss_mask[:ex.prompt_len].sum() == 0
    assert list(ex.tokens[ex.prompt_len:]) == tok.encode(rec["target"]) + [tok.eos_id]
    assert "error" in tok.decode(ids) and fmt.head == "lm"
    # Without a draft the record is the episode's first turn: the policy's layout, loss on the target.
    first_turn = fmt.example(tok, {"question": rec["question"], "target": rec["target"]})
    policy = prompts.policy_example(tok, rec["question"], rec["target"])
    np.testing.assert_array_equal(first_turn.tokens, policy.tokens)
    np.testing.assert_array_equal(first_turn.loss_mask, policy.loss_mask)


def test_two_turn_rollouts_layout_rewards_and_restore(warm_policy):
    """Each row is prompt, y1, the separator, y2 in one sequence; turn ids and the loss mask cover exactly the
    sampled tokens; rewards grade each turn; the turn-2 prompt is the `self_correct` format's."""
    import json

    from glore_jax.models import checkpoints as model_checkpoints
    from glore_jax.rl.config import RLConfig, ScoreConfig
    from glore_jax.rl.two_turn import TwoTurnRollouts, greedy_two_turn, widths
    from glore_jax.sharding import make_mesh
    from glore_jax.tasks import generate_split, is_correct
    from glore_jax.tokenizer import Tokenizer
    from glore_jax.training.config import experiment
    from tests import onpolicy

    tok_path, policy = warm_policy
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model, params = model_checkpoints.load_model(os.path.join(policy, "model"), mesh)
    tok = Tokenizer.load(tok_path)
    exp = experiment(onpolicy.config("/tmp/unused", tok_path, policy, 4, objective="score"))
    run = types.SimpleNamespace(exp=exp, model=model, mesh=mesh, tokenizer=tok)
    cfg = RLConfig(group_size=4, mu=2, max_new_tokens=40, max_prompt_len=64, temperature=1.0)
    records = list(generate_split(onpolicy.TASK, "train"))
    src = TwoTurnRollouts(run, cfg, ScoreConfig(stage=2, alpha=10.0), records, seed=5)
    batch = jax.device_get(src.next(params, 0, jax.random.key(1)))
    b, (_, width) = 16, widths(tok, cfg)
    assert batch["tokens"].shape == (b, width) and batch["turn_ids"].dtype == np.int32
    sep = [tok.eos_id] + tok.encode(prompts.SELF_CORRECT_INSTRUCTION) + [tok.control_id("[SOL]")]
    graded = 0
    for row in range(b):
        t, turn = batch["tokens"][row], batch["turn_ids"][row]
        n = int(batch["segment_ids"][row].sum())
        y1_at, y2_at = np.flatnonzero(turn == 1), np.flatnonzero(turn == 2)
        assert len(y1_at) and len(y2_at) and y1_at[-1] < y2_at[0] and y2_at[-1] == n - 1
        np.testing.assert_array_equal(y1_at, np.arange(y1_at[0], y1_at[-1] + 1))     # contiguous turns
        np.testing.assert_array_equal(batch["loss_mask"][row], (turn > 0).astype(np.float32))
        assert t[y1_at[0] - 1] == tok.control_id("[SOL]") and t[0] == tok.bos_id
        y1 = [int(x) for x in t[y1_at]]
        gap = [int(x) for x in t[y1_at[-1] + 1:y2_at[0]]]
        # A sampled EOS belongs to turn 1 (it carries loss); after a cut attempt the format adds one.
        assert gap == (sep[1:] if y1[-1] == tok.eos_id else sep)
        # The turn-2 prompt is the format's prompt for this question and attempt.
        question_ids = [int(x) for x in t[1:y1_at[0] - 1]]
        assert [int(x) for x in t[:y2_at[0]]] == prompts.self_correct_prompt(
            tok, [tok.bos_id] + question_ids + [tok.control_id("[SOL]")], y1)
        body1 = y1[:-1] if y1[-1] == tok.eos_id else y1
        y2 = [int(x) for x in t[y2_at]]
        body2 = y2[:-1] if y2[-1] == tok.eos_id else y2
        assert batch["identical"][row] == float(body1 == body2)
        question = tok.decode(question_ids)
        gold = next(r["gold"] for r in records if r["question"] == question)
        assert batch["correct_t1"][row] == float(is_correct(tok.decode(body1), gold))
        assert batch["correct_t2"][row] == float(is_correct(tok.decode(body2), gold))
        graded += 1
    assert graded == b
    expected = turn_advantages(batch["rewards_t1"], batch["rewards_t2"], stage=2, alpha=10.0, group_size=4,
                               estimator="grpo")
    np.testing.assert_allclose(batch["adv_t1"], expected[0], rtol=1e-6)
    np.testing.assert_allclose(batch["adv_t2"], expected[1], rtol=1e-6)
    # The reused batch survives a restart through JSON, turn ids still integers.
    again = TwoTurnRollouts(run, cfg, ScoreConfig(stage=2), records, seed=5)
    again.restore(json.loads(json.dumps(src.state())))
    replay = jax.device_get(again.next(params, 1, jax.random.key(2)))
    for k in batch:
        np.testing.assert_array_equal(batch[k], replay[k])
    assert replay["turn_ids"].dtype == np.int32
    # Greedy evaluation episodes: graded texts, one per record.
    rows = greedy_two_turn(model, params, tok, records[:6], mesh, max_new=40, max_prompt_len=64, rows=8)
    assert len(rows) == 6 and all(r["correct_t1"] == is_correct(r["t1"], rec["gold"]) for r, rec in
                                  zip(rows, records[:6]))


def test_score_demo_derives_each_run_from_one_config():
    """warmup -> stage1 -> stage2 and the ablation from the same base, every KL to the warmed-up base."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "score_demo.py"
    spec = importlib.util.spec_from_file_location("score_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shared = module.get_config()
    runs = {name: module.get_config(name) for name in ("warmup", "stage1", "stage2", "single")}
    warm = runs["warmup"]
    assert (warm.objective, warm.data.prompt_format, warm.init_from) == ("sft", "self_correct", shared.init_from)
    assert warm.data.max_len >= shared.rl.max_prompt_len + 2 * shared.rl.max_new_tokens
    assert (runs["stage1"].score.stage, runs["stage1"].init_from) == (1, warm.workdir)
    assert (runs["stage2"].score.stage, runs["stage2"].init_from) == (2, runs["stage1"].workdir)
    assert (runs["single"].score.stage, runs["single"].score.alpha, runs["single"].init_from) == (2, 0.0, warm.workdir)
    assert runs["stage2"].score.alpha == shared.score.alpha == 10.0
    assert {runs[k].score.reference for k in ("stage1", "stage2", "single")} == {warm.workdir}
    r = shared.score_recipe
    assert runs["single"].train.total_steps == r.stage1_steps + r.stage2_steps   # the same sample budget
    assert len({c.workdir for c in runs.values()}) == 4
    shared.unlock()
    shared.score_recipe.warmup_steps = 0      # no warm-up: SCoRe starts from init_from itself
    from glore_jax.rl.score_recipe import run_configs
    plain = run_configs(shared)
    assert "warmup" not in plain and plain["stage1"].init_from == plain["stage1"].score.reference == shared.init_from


def test_score_recipe_rejects_bad_knobs_before_any_work():
    from glore_jax.rl.config import ScoreConfig
    from glore_jax.rl.score_recipe import recipe_knobs, run_configs
    from glore_jax.training.config import base_config
    c = base_config()
    c.workdir, c.init_from, c.score_recipe = "/tmp/unused", "/tmp/unused_policy", recipe_knobs()
    assert set(run_configs(c)) == {"warmup", "stage1", "stage2", "single"}
    for key, value, message in (("score.stage", 3, "score.stage must be 1 or 2"),
                                ("score.turn1_return", "both", "turn1_return 'both' unknown"),
                                ("score.beta2", -0.1, "must be >= 0"),
                                ("score_recipe.stage2_steps", 0, "must be positive")):
        bad = base_config()
        bad.workdir, bad.init_from, bad.score_recipe = "/tmp/unused", "/tmp/unused_policy", recipe_knobs()
        group, name = key.split(".")
        bad[group][name] = value
        with pytest.raises(ConfigError, match=message):
            run_configs(bad)
    with pytest.raises(ConfigError, match="score_recipe"):
        run_configs(base_config())
    assert ScoreConfig().turn1_return == "unshaped"
