"""The clipped policy-gradient loss with a KL term, its aggregations, and per-token log-probs.

`policy_loss` is the public, mean-valued form (what users compose);
`policy_loss_terms` returns the (sum, count) pair the training loop needs
so that gradient accumulation and data-parallel shards still give the mean
over the whole batch (`objectives.base`). Arrays are padded `[B, T]` with a
float mask that is 1 on the completion tokens that carry loss.

Per token, with A the sequence's advantage and r the importance ratio:
(A and beta may also be given per token, `[B, T]`: multi-turn objectives weight each turn apart)
    -min(r * A, clip(r, 1 - eps, 1 + eps) * A) + beta * KL_t
where r = exp(logprobs - old_logprobs) (old defaults to a stop-gradient of
logprobs, so r = 1 and the gradient is REINFORCE's -A * grad log pi), or
with `ratio_level="sequence"` the exp of the sequence's summed difference
(GSPO-style). KL against the reference: k1 = lp - ref, or k3 = exp(ref - lp)
- (ref - lp) - 1 (Schulman's unbiased, non-negative estimator; GRPO's).

Aggregations (how token terms become one number):
    sequence_mean  mean over sequences of each one's masked token mean      GRPO (tunix, TRL "grpo")
    token_mean     sum over all masked tokens / their count                 DAPO (TRL "dapo"/"bnpo")
    constant       sum over all masked tokens / (B * max_tokens)            Dr. GRPO (TRL "dr_grpo")
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glore_jax.errors import ConfigError
from glore_jax.models.forward import next_token_nll

AGGREGATIONS = ("sequence_mean", "token_mean", "constant")
KL_ESTIMATORS = ("k1", "k3")
RATIO_LEVELS = ("token", "sequence")


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """`[B, T]` log pi(tokens[t] | < t) from `[B, T, V]` logits, aligned with `tokens` (0 at t = 0).

    Logits are divided by `temperature` first, so old, current and reference
    log-probs are those of the distribution the rollouts were sampled from.
    """
    nll, _ = next_token_nll(logits.astype(jnp.float32) / temperature, tokens)
    return jnp.pad(-nll[:, :-1], ((0, 0), (1, 0)))


def token_entropy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """`[B, T]` entropy of the next-token distribution, aligned like `token_logprobs`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)  # slicing [B, T], not [B, T, V]
    return jnp.pad(-jnp.sum(jnp.exp(logp) * logp, axis=-1)[:, :-1], ((0, 0), (1, 0)))


def _check(kl: str, ratio_level: str, aggregation: str) -> None:
    for value, valid, name in ((kl, KL_ESTIMATORS, "kl"), (ratio_level, RATIO_LEVELS, "ratio_level"),
                               (aggregation, AGGREGATIONS, "aggregation")):
        if value not in valid:
            raise ConfigError(f"rl.{name} {value!r} unknown; valid: {list(valid)}")


def kl_terms(logprobs: jax.Array, ref_logprobs: jax.Array, kl: str) -> jax.Array:
    if kl == "k1":
        return logprobs - ref_logprobs
    delta = ref_logprobs - logprobs
    return jnp.exp(delta) - delta - 1.0


def policy_loss_terms(logprobs, mask, advantages, *, old_logprobs=None, ref_logprobs=None, beta: float = 0.0,
                      kl: str = "k3", clip_eps: float = 0.2, ratio_level: str = "token",
                      aggregation: str = "sequence_mean", max_tokens: int | None = None, entropy=None):
    """((loss_sum, weight), aux_sums): the loss is loss_sum / weight; aux values are (sum, count) pairs."""
    _check(kl, ratio_level, aggregation)
    mask = jnp.asarray(mask, jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)
    adv = adv[:, None] if adv.ndim == 1 else adv  # [B]: one per sequence; [B, T]: per token (multi-turn)
    old = jax.lax.stop_gradient(logprobs) if old_logprobs is None else old_logprobs
    diff = (logprobs - old) * mask
    log_ratio = jnp.sum(diff, axis=1, keepdims=True) if ratio_level == "sequence" else diff
    ratio = jnp.broadcast_to(jnp.exp(log_ratio), logprobs.shape)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    n_tokens = jnp.sum(mask)
    aux = {"ratio": (jnp.sum(ratio * mask), n_tokens),
           "clip_fraction": (jnp.sum(((ratio * adv) > (clipped * adv)) * mask), n_tokens)}
    if ref_logprobs is not None:
        kl_t = kl_terms(logprobs, ref_logprobs, kl)
        aux["kl"] = (jnp.sum(kl_t * mask), n_tokens)
        if not isinstance(beta, (int, float)) or beta:  # an array: a KL weight per token (multi-turn)
            per_token = per_token + beta * kl_t
    if entropy is not None:
        aux["entropy"] = (jnp.sum(entropy * mask), n_tokens)
    b = logprobs.shape[0]
    if aggregation == "sequence_mean":
        per_seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return (jnp.sum(per_seq), jnp.asarray(b, jnp.float32)), aux
    if aggregation == "token_mean":
        return (jnp.sum(per_token * mask), n_tokens), aux
    denom = max_tokens if max_tokens is not None else logprobs.shape[1]
    return (jnp.sum(per_token * mask) / denom, jnp.asarray(b, jnp.float32)), aux


def policy_loss(logprobs, mask, advantages, *, old_logprobs=None, ref_logprobs=None, beta: float = 0.0,
                kl: str = "k3", clip_eps: float = 0.2, ratio_level: str = "token",
                aggregation: str = "sequence_mean", max_tokens: int | None = None, entropy=None):
    """(loss, aux): the clipped policy-gradient loss of the module doc, and the mean KL, clip fraction,
    ratio and (if `entropy` is given) entropy over masked tokens."""
    (total, weight), aux = policy_loss_terms(
        logprobs, mask, advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=beta, kl=kl,
        clip_eps=clip_eps, ratio_level=ratio_level, aggregation=aggregation, max_tokens=max_tokens,
        entropy=entropy)
    means = {k: s / jnp.maximum(c, 1.0) for k, (s, c) in aux.items()}
    return total / jnp.maximum(weight, 1.0), means
