"""Supervised fine-tuning: masked next-token cross entropy.

One loss serves the policy (SFT and Expert Iteration) and both refiners; the
prompt format decides which tokens are targets (`loss_mask`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glore_jax import models
from glore_jax.objectives.base import Batch, Metrics, Objective, pair


def sft_loss(params, batch: Batch, rng: jax.Array, config: models.ModelConfig,
             frozen=None) -> tuple[jax.Array, Metrics]:
    del rng, frozen
    out = models.apply(config, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                       want_values=False)
    # loss_mask[t] marks token t as a target, predicted from position t-1 (the last position predicts nothing).
    nll, hit = models.next_token_nll(out.logits, batch["tokens"])
    mask = jnp.concatenate([batch["loss_mask"][:, 1:], jnp.zeros_like(batch["loss_mask"][:, :1])], axis=1)
    loss_sum = jnp.sum(nll * mask)
    weight = jnp.sum(mask)
    correct = jnp.sum(hit * mask)
    return loss_sum, {"loss": pair(loss_sum, weight), "token_accuracy": pair(correct, weight)}


SFT = Objective(name="sft", loss_fn=sft_loss, heads=("lm",), default_format="policy")
