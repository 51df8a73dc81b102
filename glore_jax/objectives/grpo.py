"""GRPO (with RLOO and REINFORCE as settings): the on-policy objective, built from the `rl.*` knobs.

An objective is a loss plus the experience it needs: here the loss is
`rl.policy_loss_terms` on the batch `rl.Rollouts` samples from the current
params, with a frozen reference policy (the run's initial params) when
`rl.beta > 0`, and its evaluator is greedy accuracy on held-out questions.
Start it from an SFT policy: `--config.objective=grpo --config.init_from=<policy workdir>`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glore_jax import models
from glore_jax.objectives.base import FrozenSpec, Objective, pair
from glore_jax.rl.config import RLConfig
from glore_jax.rl.losses import policy_loss_terms, token_entropy, token_logprobs


def policy_loss_fn(cfg: RLConfig, max_tokens: int, row_means: tuple[str, ...] = ()):
    """The clipped policy-gradient loss over `batch['loss_mask']` with one advantage per row, for any
    rollout source that fills the `Rollouts` keys; `row_means` names further per-row fields to log."""

    def loss_fn(params, batch, rng, model: models.ModelConfig, frozen):
        del rng
        tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
        logits = models.apply(model, params, tokens, positions, segments, want_values=False).logits
        logprobs = token_logprobs(logits, tokens, cfg.temperature)
        ref = None
        if "reference" in frozen:
            ref_logits = models.apply(model, frozen["reference"], tokens, positions, segments, want_values=False).logits
            ref = jax.lax.stop_gradient(token_logprobs(ref_logits, tokens, cfg.temperature))
        (total, weight), aux = policy_loss_terms(
            logprobs, batch["loss_mask"], batch["advantages"], old_logprobs=batch.get("old_logprobs"),
            ref_logprobs=ref, beta=cfg.beta, kl=cfg.kl, clip_eps=cfg.clip_eps, ratio_level=cfg.ratio_level,
            aggregation=cfg.aggregation, max_tokens=max_tokens,
            entropy=jax.lax.stop_gradient(token_entropy(logits, cfg.temperature)))
        b = jnp.asarray(tokens.shape[0], jnp.float32)
        metrics = {"loss": pair(total, weight), **{k: pair(s, c) for k, (s, c) in aux.items()},
                   "reward": pair(jnp.sum(batch["rewards"]), b),
                   "reward_sq": pair(jnp.sum(batch["rewards"] ** 2), b),
                   "accuracy": pair(jnp.sum(batch["correct"]), b),
                   "completion_length": pair(jnp.sum(batch["loss_mask"]), b),
                   "cut_at_limit": pair(b - jnp.sum(batch["stopped"]), b),
                   **{k: pair(jnp.sum(batch[k]), b) for k in row_means}}
        return total, metrics
    return loss_fn


def build(cfg: RLConfig, batch_size: int) -> Objective:
    """The `grpo` objective for these knobs (`rl.estimator` picks grpo, rloo or reinforce advantages)."""
    cfg.check(batch_size)
    loss_fn = policy_loss_fn(cfg, cfg.max_new_tokens)

    def experience(run):
        from glore_jax.rl.rollouts import Rollouts  # late: the sampler is only needed when training
        return Rollouts(run, cfg, run.records, seed=run.exp.seed)

    def evaluate(run):
        from glore_jax.training.evals import held_out_accuracy  # late: evals import the objectives
        return held_out_accuracy(run, cfg.max_new_tokens)

    return Objective(name="grpo", loss_fn=loss_fn, heads=("lm",), default_format="policy",
                     frozen=(FrozenSpec(name="reference"),) if cfg.beta > 0 else (), experience=experience,
                     evaluate=evaluate)
