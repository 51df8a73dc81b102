"""SCoRe: two-turn RL that teaches the policy to correct its own first attempt (Kumar et al. 2024).

The loss is `rl.policy_loss_terms` with per-token advantages and KL weights
(`rl.score.token_weights`: stage 1 trains turn 2 and holds turn 1 with
beta2; stage 2 trains both turns on the shaped reward), on the two-turn
episodes `rl.two_turn.TwoTurnRollouts` samples from the current params. The
KL reference is frozen: the run's initial params, or `score.reference`
(stage 2 of the recipe starts from stage 1's model but keeps the base
policy as its reference, as the paper does). Its evaluator decodes both
turns greedily on held-out questions and logs Acc@t1, Acc@t2 and the
wrong->right / right->wrong shares.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glore_jax import models
from glore_jax.objectives.base import FrozenSpec, Objective, pair, reference_derive
from glore_jax.rl.config import RLConfig, ScoreConfig
from glore_jax.rl.losses import kl_terms, policy_loss_terms, token_entropy, token_logprobs
from glore_jax.rl.score import self_correction_counts, token_weights


def build(cfg: RLConfig, score: ScoreConfig, batch_size: int) -> Objective:
    """The `score` objective for these knobs (`score.stage` 1 or 2)."""
    cfg.check(batch_size)
    score.check()

    def loss_fn(params, batch, rng, model: models.ModelConfig, frozen):
        del rng
        tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
        logits = models.apply(model, params, tokens, positions, segments, want_values=False).logits
        logprobs = token_logprobs(logits, tokens, cfg.temperature)
        ref_logits = models.apply(model, frozen["reference"], tokens, positions, segments, want_values=False).logits
        ref = jax.lax.stop_gradient(token_logprobs(ref_logits, tokens, cfg.temperature))
        adv, beta = token_weights(batch["turn_ids"], batch["adv_t1"], batch["adv_t2"], stage=score.stage,
                                  beta1=score.beta1, beta2=score.beta2)
        (total, weight), aux = policy_loss_terms(
            logprobs, batch["loss_mask"], adv, old_logprobs=batch.get("old_logprobs"), ref_logprobs=ref,
            beta=beta, kl=cfg.kl, clip_eps=cfg.clip_eps, ratio_level=cfg.ratio_level,
            aggregation=cfg.aggregation, max_tokens=2 * cfg.max_new_tokens,
            entropy=jax.lax.stop_gradient(token_entropy(logits, cfg.temperature)))
        b = jnp.asarray(tokens.shape[0], jnp.float32)
        kl_t = kl_terms(logprobs, ref, cfg.kl)
        per_turn = {}
        for turn in (1, 2):  # turn 1's KL is what stage 1 holds down; log it apart
            m = (batch["turn_ids"] == turn).astype(jnp.float32)
            per_turn[f"kl_t{turn}"] = pair(jnp.sum(jax.lax.stop_gradient(kl_t) * m), jnp.sum(m))
            per_turn[f"length_t{turn}"] = pair(jnp.sum(m), b)
        counts = self_correction_counts(batch["correct_t1"], batch["correct_t2"])
        metrics = {"loss": pair(total, weight), **{k: pair(s, c) for k, (s, c) in aux.items()}, **per_turn,
                   **{k: pair(v, b) for k, v in counts.items()},
                   "reward": pair(jnp.sum(batch["rewards_t2"]), b),
                   "reward_sq": pair(jnp.sum(batch["rewards_t2"] ** 2), b),
                   "reward_t1": pair(jnp.sum(batch["rewards_t1"]), b),
                   "identical": pair(jnp.sum(batch["identical"]), b),
                   "cut_at_limit": pair(b - jnp.sum(batch["stopped"]), b)}
        return total, metrics

    def experience(run):
        from glore_jax.rl.two_turn import TwoTurnRollouts  # late: the sampler is only needed when training
        return TwoTurnRollouts(run, cfg, score, run.records, seed=run.exp.seed)

    def evaluate(run):
        from glore_jax.training.evals import held_out_records  # late: evals import the objectives
        records = held_out_records(run)
        return None if records is None else SelfCorrectionEval(run, records, cfg)

    return Objective(name="score", loss_fn=loss_fn, heads=("lm",), default_format="policy",
                     frozen=(FrozenSpec(name="reference", derive=reference_derive(score.reference)),),
                     experience=experience, evaluate=evaluate)


class SelfCorrectionEval:
    """Greedy two-turn episodes on held-out records: eval_acc_t1, eval_acc_t2, eval_delta, ... ."""

    def __init__(self, run, records, cfg: RLConfig):
        self.run, self.records, self.cfg = run, list(records), cfg

    def __call__(self, params, frozen) -> dict[str, float]:
        del frozen
        from glore_jax.rl.score import self_correction_metrics
        from glore_jax.rl.two_turn import greedy_two_turn
        rows = greedy_two_turn(self.run.model, params, self.run.tokenizer, self.records, self.run.mesh,
                               max_new=self.cfg.max_new_tokens, max_prompt_len=self.cfg.max_prompt_len)
        out = self_correction_metrics([r["correct_t1"] for r in rows], [r["correct_t2"] for r in rows])
        out["identical"] = sum(r["identical"] for r in rows) / len(rows)
        return {f"eval_{k}": v for k, v in out.items()}
