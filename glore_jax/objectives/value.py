"""ORM and SORM: the value head's binary cross entropy at each step's last token.

Both read the same batch layout (`step_end_mask`, `step_labels` with -1 =
ignore); they differ only in where labels come from, i.e. in the prompt
format: 'orm' repeats the final outcome on every step, 'sorm' takes
per-step labels estimated from rollouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from glore_jax import models
from glore_jax.objectives.base import Batch, Metrics, Objective, pair


def value_loss(params, batch: Batch, rng: jax.Array, config: models.ModelConfig,
               frozen=None) -> tuple[jax.Array, Metrics]:
    del rng, frozen
    out = models.apply(config, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                       want_logits=False)
    labels = batch["step_labels"]
    valid = (batch["step_end_mask"] > 0) & (labels >= 0)
    # Soft labels (rollout success rates) are allowed; records are checked to
    # hold [0, 1] or -1 (`prompts.check_record`), and -1 positions are masked.
    target = jnp.where(valid, labels, 0.0)
    bce = optax.sigmoid_binary_cross_entropy(out.values, target)
    weight = jnp.sum(valid)
    loss_sum = jnp.sum(jnp.where(valid, bce, 0.0))
    predicted = out.values > 0
    hit = (predicted == (target >= 0.5)) & valid
    # Final-answer accuracy: the prediction at each row's last scorable position.
    t = jnp.arange(labels.shape[1])[None, :]
    last = jnp.max(jnp.where(valid, t, -1), axis=1)
    has_final = last >= 0
    final_hit = jnp.take_along_axis(hit, jnp.maximum(last, 0)[:, None], axis=1)[:, 0] & has_final
    return loss_sum, {"loss": pair(loss_sum, weight), "step_accuracy": pair(jnp.sum(hit), weight),
                      "final_accuracy": pair(jnp.sum(final_hit), jnp.sum(has_final)),
                      "positive_rate": pair(jnp.sum(jnp.where(valid, target, 0.0)), weight)}


ORM = Objective(name="orm", loss_fn=value_loss, heads=("value",), default_format="orm")
SORM = Objective(name="sorm", loss_fn=value_loss, heads=("value",), default_format="sorm")
