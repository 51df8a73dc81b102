"""LaTRO: hand-computed rewards, advantages and loss; the answer span; the rollouts; a killed run resumes."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glore_jax import prompts
from glore_jax.errors import ConfigError
from glore_jax.rl import latro_advantages, latro_loss
from glore_jax.rl.latro import sequence, sequence_logprobs, truncate_rationale
from glore_jax.sharding import make_mesh
from glore_jax.tasks import generate_split
from glore_jax.tokenizer import Tokenizer
from tests import onpolicy
from tests.test_onpolicy import _job, _metrics, kill_after_a_checkpoint


def test_non_stop_penalty_uses_the_mean_over_the_whole_batch():
    r = [-1.0, -2.0, -10.0, -20.0]
    adv, rewards = latro_advantages(r, [0.0] * 4, [0.0] * 4, [True, True, True, False], 2, 0.05)
    batch_mean = np.mean(r)                      # -8.25; the group's would be -15
    np.testing.assert_allclose(rewards, [-1.0, -2.0, -10.0, 2 * batch_mean])
    np.testing.assert_allclose(adv, [1.0, -1.0, -10.0 - 2 * batch_mean, 2 * batch_mean + 10.0])
    _, off = latro_advantages(r, [0.0] * 4, [0.0] * 4, [True, True, True, False], 2, 0.05, non_stop_penalty=False)
    np.testing.assert_allclose(off, r)
    _, triple = latro_advantages(r, [0.0] * 4, [0.0] * 4, [True, True, True, False], 2, 0.05, penalty_multiplier=3.0)
    assert triple[3] == pytest.approx(3 * batch_mean)


def test_rloo_baseline_leaves_the_sample_itself_out():
    adv, _ = latro_advantages([1.0, 2.0, 4.0, 0.0, 0.0, 3.0], [0.0] * 6, [0.0] * 6, [True] * 6, 3, 0.0)
    # (R_k - mean of the other two) per group; a mean including R_k would give (2/3) of each.
    np.testing.assert_allclose(adv, [1 - 3, 2 - 2.5, 4 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0])


def test_kl_term_is_beta_times_the_summed_rationale_log_prob_difference():
    # Sums over the rationale (e.g. -3 = -1 + -2 over two tokens) enter R = r - beta (lp - ref) once each.
    adv, rewards = latro_advantages([0.0, 0.0], [-3.0, -5.0], [-4.0, -4.0], [True, True], 2, 0.5)
    np.testing.assert_allclose(rewards, [0.0, 0.0])       # the KL is not folded into the returned r
    np.testing.assert_allclose(adv, [-0.5 - 0.5, 0.5 + 0.5])
    with pytest.raises(ValueError, match="B\\*K"):
        latro_advantages([0.0, 0.0], [0.0], [0.0, 0.0], [True, True], 2, 0.5)
    with pytest.raises(ValueError, match="group_size"):
        latro_advantages([0.0] * 3, [0.0] * 3, [0.0] * 3, [True] * 3, 2, 0.5)


def test_sequence_logprobs_sum_over_tokens_not_mean():
    logits = jax.random.normal(jax.random.key(0), (1, 6, 11))
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]])
    z = jnp.asarray([[0, 0, 1, 1, 0, 0]], jnp.float32)
    y = jnp.asarray([[0, 0, 0, 0, 1, 1]], jnp.float32)
    lp = jax.nn.log_softmax(logits[0], -1)
    rationale, answer = sequence_logprobs(logits, tokens, z, y, temperature=0.5)
    lp_t = jax.nn.log_softmax(logits[0] / 0.5, -1)
    np.testing.assert_allclose(rationale[0], lp_t[1, 3] + lp_t[2, 4], rtol=1e-5)   # at the sampling temperature
    np.testing.assert_allclose(answer[0], lp[3, 5] + lp[4, 6], rtol=1e-5)          # the model's own likelihood


@pytest.mark.parametrize("sft_penalty", [0.0, 0.5])
def test_loss_value_and_gradients(sft_penalty):
    adv, lp, r = jnp.asarray([2.0, -1.0]), jnp.asarray([-3.0, -5.0]), jnp.asarray([-1.0, -4.0])
    loss, aux = latro_loss(adv, lp, r, sft_penalty)
    pg, sft = ((-2.0 * -3.0) + (1.0 * -5.0)) / 2, (1.0 + 4.0) / 2
    assert float(loss) == pytest.approx(pg + sft_penalty * sft)
    assert (float(aux["policy_loss"]), float(aux["sft_loss"])) == pytest.approx((pg, sft))
    g_adv, g_lp, g_r = jax.grad(lambda a, b, c: latro_loss(a, b, c, sft_penalty)[0], argnums=(0, 1, 2))(adv, lp, r)
    np.testing.assert_allclose(g_adv, 0.0)                     # advantages are constants
    np.testing.assert_allclose(g_lp, -adv / 2)                 # REINFORCE: -A grad log pi(z|x), mean over samples
    np.testing.assert_allclose(g_r, -sft_penalty / 2 * np.ones(2))   # r is trained only through the SFT term
    np_loss, _ = latro_loss(np.asarray(adv), np.asarray(lp), np.asarray(r), sft_penalty)   # numpy in, numpy out
    assert np_loss == pytest.approx(float(loss))


def test_answer_span_is_the_answer_only_and_official_adds_the_rationale_last_token():
    tokens, z, y = sequence([1, 2], [3, 4, 5], [6, 7], "clean")
    np.testing.assert_array_equal(tokens, [1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(z, [0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(y, [0, 0, 0, 0, 0, 1, 1])
    _, z_off, y_off = sequence([1, 2], [3, 4, 5], [6, 7], "official")
    np.testing.assert_array_equal(z_off, z)
    np.testing.assert_array_equal(y_off, [0, 0, 0, 0, 1, 1, 1])   # position 4: log pi(z's last token | ...)
    _, _, y_empty = sequence([1, 2], [], [6, 7], "official")       # no rationale: the prompt's last token
    np.testing.assert_array_equal(y_empty, [0, 1, 1, 1])
    with pytest.raises(ValueError, match="span"):
        sequence([1], [2], [3], "both")


def test_truncate_rationale_finds_stops_in_text_whatever_the_pieces(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    body = "Tom has 3 + 4 = <<3+4=7>>7 apples.\n"
    for tail in ("#### 7", "The answer is 7."):
        ids = tok.encode(body + tail) + [tok.eos_id]
        rationale, stopped = truncate_rationale(tok, ids, prompts.LATRO_STOPS)
        assert stopped and tok.decode(rationale) == tok.decode(tok.encode(body)), tail
    eos_only, stopped = truncate_rationale(tok, tok.encode("Tom has 7.") + [tok.eos_id, 5, 6], ())
    assert stopped and tok.decode(eos_only) == "Tom has 7."
    cut, stopped = truncate_rationale(tok, tok.encode(body + "##"), prompts.LATRO_STOPS)   # marker cut by the limit
    assert not stopped and cut == tok.encode(body + "##")


def test_line_start_answer_matches_the_pieces_written_after_a_rationale(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    for name in prompts.LATRO_ANSWERS:
        text = prompts.LATRO_ANSWERS[name].format(gold="12")
        in_context = tok.encode("Tom has 12 apples.\n" + text)
        y = prompts.latro_answer(tok, name, "12", line_start=True)
        assert y[-1] == tok.eos_id and in_context[-(len(y) - 1):] == y[:-1], name
        example = prompts.get(name).example(tok, {"question": "How many?", "gold": "12"})   # answer-only SFT
        assert tok.decode(example.tokens[example.loss_mask > 0]) == text


def test_config_errors_are_one_line():
    from glore_jax import objectives
    from glore_jax.training.config import base_config, experiment
    for key, value, match in (("k", 1, "latro.k"), ("k", 3, "latro.k"), ("answer_format", "policy", "answer_format"),
                              ("answer_span", "both", "answer_span"), ("temperature", 0.0, "temperature")):
        c = base_config()
        c.workdir, c.objective, c.train.batch_size = "/tmp/unused", "latro", 32
        c.latro[key] = value
        with pytest.raises(ConfigError, match=match) as err:
            objectives.get("latro", experiment(c))
        assert "\n" not in str(err.value)


def _run(warm_policy):
    from glore_jax.models import checkpoints as model_checkpoints
    from glore_jax.training.config import experiment
    tok_path, policy = warm_policy
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model, params = model_checkpoints.load_model(os.path.join(policy, "model"), mesh)
    exp = experiment(onpolicy.config("/tmp/unused", tok_path, policy, 4, objective="latro"))
    return types.SimpleNamespace(exp=exp, model=model, mesh=mesh, tokenizer=Tokenizer.load(tok_path)), params


def test_rollouts_score_the_gold_answer_after_each_rationale(warm_policy):
    """Masks split x | z | y, y is the gold answer string, rewards are log pi(y | x, z) from one forward
    pass, the KL is 0 against identical params and nonzero against others, and RLOO centres each group."""
    from glore_jax.rl.latro_rollouts import LatroRollouts
    from glore_jax.rl.losses import token_logprobs
    run, params = _run(warm_policy)
    tok, lt = run.tokenizer, run.exp.latro
    records = list(generate_split(onpolicy.TASK, "train"))
    src = LatroRollouts(run, lt, records, seed=3)
    batch = jax.device_get(src.next(params, 0, jax.random.key(1), frozen={"reference": params}))
    b = run.exp.train.batch_size
    assert batch["tokens"].shape[0] == b and np.all(batch["loss_mask"] * batch["answer_mask"] == 0)
    np.testing.assert_allclose(batch["kl"], 0.0, atol=1e-5)
    np.testing.assert_allclose(batch["advantages"].reshape(-1, lt.k).sum(axis=1), 0.0, atol=1e-3)
    from glore_jax import models
    logits = models.apply(run.model, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                          want_values=False).logits
    lp = np.asarray(token_logprobs(logits, jnp.asarray(batch["tokens"])))
    chosen = [records[i] for i in np.random.default_rng([3, 0]).permutation(len(records))[:b // lt.k]]
    for row in range(b):
        y = batch["tokens"][row][batch["answer_mask"][row] > 0]
        z = batch["tokens"][row][batch["loss_mask"][row] > 0]
        gold = chosen[row // lt.k]["gold"]
        assert y.tolist() == prompts.latro_answer(tok, lt.answer_format, gold,
                                                  line_start=tok.decode(z.tolist()).endswith("\n"))
        assert "####" not in tok.decode(z.tolist())          # the rationale stops before the answer marker
        if batch["stopped"][row]:
            assert batch["rewards"][row] == pytest.approx(float((lp[row] * batch["answer_mask"][row]).sum()), abs=1e-3)
    shifted = jax.tree_util.tree_map(lambda p: p * 1.01, params)
    other = jax.device_get(LatroRollouts(run, lt, records, seed=3).next(params, 0, jax.random.key(1),
                                                                         frozen={"reference": shifted}))
    np.testing.assert_array_equal(other["tokens"], batch["tokens"])   # the same draw: only the KL moves
    assert np.abs(other["kl"]).max() > 1e-3 and not np.allclose(other["advantages"], batch["advantages"])


def test_latro_logs_its_metrics_and_resumes_exactly_after_kill_9(warm_policy, tmp_path):
    tok, policy = warm_policy
    steps = 8
    out, _ = _job(tmp_path / "straight", tok, policy, steps, "latro").communicate(timeout=600)
    assert '"finished": 8' in out, out[-3000:]
    straight = _metrics(tmp_path / "straight")
    assert [r["step"] for r in straight] == list(range(1, steps + 1))
    assert abs(straight[0]["kl"]) < 1e-5 and any(abs(r["kl"]) > 1e-4 for r in straight[1:])   # the reference is frozen
    assert all(r["reward"] < 0 for r in straight)               # a log-likelihood
    for r in straight:   # ELBO = mean(r - beta KL) with beta = 0.05
        assert r["elbo"] == pytest.approx(r["reward"] - 0.05 * r["kl"], abs=1e-3), r
    for key in ("elbo", "self_reward", "policy_loss", "sft_loss", "accuracy", "rationale_length", "cut_at_limit",
                "reward_std", "sample_tokens_per_sec", "peak_rss_gb"):
        assert key in straight[-1], key
    killed = tmp_path / "killed"
    assert 2 <= kill_after_a_checkpoint(_job(killed, tok, policy, steps, "latro"), killed) < steps
    assert len(_metrics(killed)) < steps
    out, _ = _job(killed, tok, policy, steps, "latro").communicate(timeout=600)
    assert '"finished": 8' in out, out[-3000:]
    resumed = _metrics(killed)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["reward"], a["kl"], a["elbo"]) == (b["loss"], b["reward"], b["kl"], b["elbo"]), (a, b)


def test_recipe_majority_and_run_configs(tmp_path):
    from glore_jax.rl.latro_recipe import majority, run_configs
    assert majority(["x #### 3", "#### 4", "y #### 3.0", "no answer"]) == "3"
    assert majority(["#### 4", "#### 3"]) == "4"              # a tie: the first seen
    assert majority(["nothing"]) is None
    import configs.latro_demo as demo_cfg
    c = demo_cfg.get_config()
    runs = run_configs(c)
    assert set(runs) == {"latro", "sft_answer"}
    assert runs["sft_answer"].objective == "sft" and runs["sft_answer"].data.prompt_format == "latro_hash"
    assert runs["latro"].train.total_steps == runs["sft_answer"].train.total_steps   # the same steps and batch
    c.unlock()
    c.init_from = ""
    with pytest.raises(ConfigError, match="init_from"):
        run_configs(c)
    c.init_from, c.latro.k = "x", 5
    with pytest.raises(ConfigError, match="latro.k"):
        run_configs(c)
    json.dumps(runs["latro"].to_dict())
