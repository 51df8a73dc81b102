"""LaTRO as an objective of the one loop: rationales sampled from the current policy, rewarded by the
likelihood the policy itself gives the gold answer after them (`glore_jax.rl.latro`).

The experience (`rl.latro_rollouts.LatroRollouts`) samples K rationales per
question and computes, in one teacher-forced pass of the current params and
one of the frozen reference, the self-reward, the KL and the RLOO
advantages. The loss runs one forward pass over x + z + y with gradient and
reads both sums from it: log pi(z|x) for the policy-gradient term and
log pi(y|x, z) for the `sft_penalty` term. The reference is the run's
initial params, or `latro.reference`. The evaluator is greedy accuracy on
held-out questions (self-consistency is in `rl.latro_recipe`'s report).
"""

from __future__ import annotations

import jax.numpy as jnp

from glore_jax import models
from glore_jax.objectives.base import FrozenSpec, Objective, pair, reference_derive
from glore_jax.rl.config import LatroConfig
from glore_jax.rl.latro import latro_loss_terms, sequence_logprobs


def build(latro: LatroConfig, batch_size: int) -> Objective:
    """The `latro` objective for these knobs."""
    latro.check(batch_size)

    def loss_fn(params, batch, rng, model: models.ModelConfig, frozen):
        del rng, frozen  # the reference enters through the reward, computed at sampling time
        tokens = batch["tokens"]
        logits = models.apply(model, params, tokens, batch["positions"], batch["segment_ids"],
                              want_values=False).logits
        rationale, answer = sequence_logprobs(logits, tokens, batch["loss_mask"], batch["answer_mask"],
                                              latro.temperature)
        (total, n), aux = latro_loss_terms(batch["advantages"], rationale, answer, latro.sft_penalty)
        b = jnp.asarray(tokens.shape[0], jnp.float32)
        means = {k: pair(jnp.sum(batch[k]), b) for k in ("rewards", "self_reward", "elbo", "kl", "correct")}
        metrics = {"loss": pair(total, n), **{k: pair(s, c) for k, (s, c) in aux.items()},
                   "reward": means.pop("rewards"), "accuracy": means.pop("correct"), **means,
                   "reward_sq": pair(jnp.sum(batch["rewards"] ** 2), b),
                   "rationale_length": pair(jnp.sum(batch["loss_mask"]), b),
                   "cut_at_limit": pair(b - jnp.sum(batch["stopped"]), b)}
        return total, metrics

    def experience(run):
        from glore_jax.rl.latro_rollouts import LatroRollouts  # late: the sampler is only needed when training
        return LatroRollouts(run, latro, run.records, seed=run.exp.seed)

    def evaluate(run):
        from glore_jax.training.evals import held_out_accuracy  # late: evals import the objectives
        return held_out_accuracy(run, latro.max_rationale_tokens + 16)

    return Objective(name="latro", loss_fn=loss_fn, heads=("lm",), default_format=latro.answer_format,
                     frozen=(FrozenSpec(name="reference", derive=reference_derive(latro.reference)),)
                     if latro.beta > 0 else (), experience=experience, evaluate=evaluate)
