"""glore_jax.rl against hand-computed values: advantages, the KL-in-reward, and the policy loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glore_jax import errors
from glore_jax.rl import advantages, kl_penalized_rewards, policy_loss, token_logprobs

R = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], np.float32)  # two groups of 3


def test_advantages_by_hand():
    # group 1: mean 1/3, unbiased std sqrt(1/3); group 2: all equal
    s = np.sqrt(1 / 3)
    np.testing.assert_allclose(advantages(R, 3, "grpo"),
                               [(2 / 3) / (s + 1e-4), (-1 / 3) / (s + 1e-4), (-1 / 3) / (s + 1e-4), 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(advantages(R, 3, "rloo"), [1 - 0, 0 - 0.5, 0 - 0.5, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(advantages(R, 3, "reinforce"), R - 4 / 6, atol=1e-7)
    np.testing.assert_allclose(advantages([3.0, 1.0], 2, "rloo"), [2.0, -2.0])
    with pytest.raises(errors.ConfigError, match="groups of 4"):
        advantages(R, 4, "grpo")
    with pytest.raises(errors.ConfigError, match="at least 2"):
        advantages(R, 1, "rloo")
    with pytest.raises(errors.ConfigError, match="unknown"):
        advantages(R, 3, "ppo")


def test_kl_penalized_rewards_by_hand():
    lp = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = np.array([[-1.5, -2.0, -1.0], [-1.0, -0.25, 0.0]])
    mask = np.array([[1, 1, 0], [1, 1, 0]], np.float32)
    # sums of lp - ref on masked tokens: 0.5 + 0 = 0.5; 0.5 - 0.25 = 0.25
    np.testing.assert_allclose(kl_penalized_rewards([1.0, 0.0], lp, ref, mask, 0.1), [1 - 0.05, -0.025], rtol=1e-6)


LP = np.array([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.2, 0.0, 0.0]], np.float32)
OLD = np.array([[-1.2, -1.5, -0.5, 0.0], [-0.3, -1.0, 0.0, 0.0]], np.float32)
REF = np.array([[-0.8, -2.5, -0.7, 0.0], [-0.6, -1.2, 0.0, 0.0]], np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)  # ragged: 3 and 2 tokens
ADV = np.array([1.5, -0.5], np.float32)


def _reference(lp, old, ref, mask, adv, beta, kl, eps, level, agg, max_tokens=None):
    """The formulae of the issue, loop by loop."""
    B, T = lp.shape
    terms = np.zeros((B, T))
    for b in range(B):
        seq_ratio = np.exp(sum((lp[b, t] - old[b, t]) * mask[b, t] for t in range(T)))
        for t in range(T):
            r = seq_ratio if level == "sequence" else np.exp(lp[b, t] - old[b, t])
            pg = -min(r * adv[b], np.clip(r, 1 - eps, 1 + eps) * adv[b])
            d = ref[b, t] - lp[b, t]
            k = (lp[b, t] - ref[b, t]) if kl == "k1" else (np.exp(d) - d - 1)
            terms[b, t] = pg + beta * k
    if agg == "sequence_mean":
        return np.mean([np.sum(terms[b] * mask[b]) / np.sum(mask[b]) for b in range(B)])
    if agg == "token_mean":
        return np.sum(terms * mask) / np.sum(mask)
    return np.sum(terms * mask) / (B * (max_tokens or T))


@pytest.mark.parametrize("agg", ["sequence_mean", "token_mean", "constant"])
@pytest.mark.parametrize("kl", ["k1", "k3"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_matches_the_formulae(agg, kl, level):
    for old, beta, eps in ((OLD, 0.1, 0.2), (LP, 0.0, 0.2), (OLD, 0.3, 0.05)):
        loss, aux = policy_loss(jnp.asarray(LP), MASK, ADV, old_logprobs=jnp.asarray(old), ref_logprobs=REF,
                                beta=beta, kl=kl, clip_eps=eps, ratio_level=level, aggregation=agg, max_tokens=6)
        want = _reference(LP, old, REF, MASK, ADV, beta, kl, eps, level, agg, max_tokens=6)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    d = REF - LP
    k = (LP - REF) if kl == "k1" else np.exp(d) - d - 1
    np.testing.assert_allclose(float(aux["kl"]), np.sum(k * MASK) / MASK.sum(), rtol=1e-5)


def test_clip_fraction_and_ratio_by_hand():
    # Token ratios e^0.2, e^-0.5, 1 | 1, e^-0.2. With eps 0.2, row 0 (A > 0) is clipped where r > 1.2:
    # e^0.2 = 1.221, one token; row 1 (A < 0) where r < 0.8: e^-0.2 = 0.819 is not. So 1 of 5 tokens.
    _, aux = policy_loss(jnp.asarray(LP), MASK, ADV, old_logprobs=jnp.asarray(OLD), clip_eps=0.2)
    np.testing.assert_allclose(float(aux["clip_fraction"]), 1 / 5, rtol=1e-6)
    ratios = np.exp((LP - OLD))[MASK > 0]
    np.testing.assert_allclose(float(aux["ratio"]), ratios.mean(), rtol=1e-6)


def test_ratio_one_and_no_kl_gives_the_reinforce_gradient():
    """With old = current (ratio 1) and beta = 0 the gradient is -A * grad log pi, aggregated."""
    key = jax.random.key(0)
    logits = jax.random.normal(key, (2, 4, 7))
    tokens = jnp.array([[1, 3, 5, 2], [4, 4, 0, 6]])

    def loss(logits, agg):
        lp = token_logprobs(logits, tokens)
        return policy_loss(lp, MASK, ADV, aggregation=agg, max_tokens=4)[0]

    def reinforce(logits, agg):
        lp = token_logprobs(logits, tokens) * MASK
        if agg == "sequence_mean":
            return -jnp.mean(ADV * jnp.sum(lp, 1) / MASK.sum(1))
        if agg == "token_mean":
            return -jnp.sum(ADV[:, None] * lp) / MASK.sum()
        return -jnp.sum(ADV[:, None] * lp) / (2 * 4)

    for agg in ("sequence_mean", "token_mean", "constant"):
        np.testing.assert_allclose(jax.grad(loss)(logits, agg), jax.grad(reinforce)(logits, agg), rtol=1e-5, atol=1e-7)


def test_token_logprobs_are_aligned_with_tokens():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]]))
    lp = token_logprobs(logits, jnp.array([[0, 1, 1]]))
    np.testing.assert_allclose(lp, [[0.0, np.log(0.5), np.log(0.1)]], rtol=1e-6)
    np.testing.assert_allclose(token_logprobs(logits, jnp.array([[0, 1, 1]]), temperature=2.0)[0, 1],
                               np.log(np.sqrt(0.5) / (2 * np.sqrt(0.5))), rtol=1e-6)
