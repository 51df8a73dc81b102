"""Advantages from grouped rewards, and the KL-in-reward penalty: the RL pieces that see only rewards.

Rewards are a flat `[B]` array whose groups are contiguous rows: the G
completions of prompt i are rows i*G .. i*G+G-1. Each estimator is a
baseline subtracted from the reward (and for GRPO a scale), computed
without gradients (rewards carry none).

    grpo       (r - group mean) / (unbiased group std + 1e-4)     Shao et al. 2024 (DeepSeekMath)
    rloo       r - mean of the other G-1 rewards of its group      Ahmadian et al. 2024 (leave-one-out)
    reinforce  r - batch mean                                      Williams 1992, with a batch baseline
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glore_jax.errors import ConfigError

ESTIMATORS = ("grpo", "rloo", "reinforce")
GRPO_EPS = 1e-4


def advantages(rewards: jax.Array, group_size: int, estimator: str) -> jax.Array:
    """`[B]` advantages of `[B]` rewards in contiguous groups of `group_size`."""
    r = jnp.asarray(rewards, jnp.float32)
    if estimator not in ESTIMATORS:
        raise ConfigError(f"advantage estimator {estimator!r} unknown; valid: {list(ESTIMATORS)}")
    if group_size < 1 or r.shape[0] % group_size:
        raise ConfigError(f"{r.shape[0]} rewards do not split into groups of {group_size}")
    if estimator == "reinforce":
        return r - jnp.mean(r)
    if group_size < 2:
        raise ConfigError(f"estimator {estimator!r} needs groups of at least 2 (rl.group_size), got {group_size}")
    g = r.reshape(-1, group_size)
    if estimator == "rloo":
        others = (jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)
        return (g - others).reshape(-1)
    std = jnp.std(g, axis=1, keepdims=True, ddof=1)
    return ((g - jnp.mean(g, axis=1, keepdims=True)) / (std + GRPO_EPS)).reshape(-1)


def kl_penalized_rewards(rewards: jax.Array, sample_logprobs: jax.Array, ref_logprobs: jax.Array,
                         mask: jax.Array, beta: float) -> jax.Array:
    """r - beta * sum_t mask * (log pi_sample - log pi_ref): the KL as a reward term (RLOO, LaTRO).

    The per-sequence sum of the k1 estimator on the sampled tokens; it is a
    reward, so it carries no gradient.
    """
    kl = jnp.sum(jnp.asarray(mask, jnp.float32) * (sample_logprobs - ref_logprobs), axis=-1)
    return jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32) - beta * kl)
