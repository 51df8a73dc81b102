"""Supervised fine-tuning: masked next-token cross entropy.

One loss serves the policy (SFT and Expert Iteration) and both refiners; the
prompt format decides which tokens are targets (`loss_mask`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glore_jax import models
from glore_jax.objectives.base import Batch, Metrics, Objective, pair


def next_token_nll(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, T, V] logits, [B, T] tokens -> float32 [B, T] -log p(tokens[t+1] | <= t), and [B, T] top-1 hits.

    Position T-1 has no next token: it gets a finite dummy loss, for the mask to
    zero. A hit is "the target's logit is the largest", so a tie counts as a hit.
    Why not `optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ...)`
    and an argmax: on XLA:CPU the slice's gradient is a pad of the whole
    [B, T, V] gradient, the label gather's a scatter, and argmax a two-output
    reduce; together ~25 ms of a ~200 ms demo-model train step (2-core EPYC).
    Here everything is elementwise work and plain max/sum reductions.
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    log_norm = jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)) + top
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    label = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    return log_norm - label, label >= top


def sft_loss(params, batch: Batch, rng: jax.Array, config: models.ModelConfig,
             frozen=None) -> tuple[jax.Array, Metrics]:
    del rng, frozen
    out = models.apply(config, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                       want_values=False)
    # loss_mask[t] marks token t as a target, predicted from position t-1 (the last position predicts nothing).
    nll, hit = next_token_nll(out.logits, batch["tokens"])
    mask = jnp.concatenate([batch["loss_mask"][:, 1:], jnp.zeros_like(batch["loss_mask"][:, :1])], axis=1)
    loss_sum = jnp.sum(nll * mask)
    weight = jnp.sum(mask)
    correct = jnp.sum(hit * mask)
    return loss_sum, {"loss": pair(loss_sum, weight), "token_accuracy": pair(correct, weight)}


SFT = Objective(name="sft", loss_fn=sft_loss, heads=("lm",), default_format="policy")
