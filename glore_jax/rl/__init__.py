"""On-policy RL on the one training loop: rewards -> advantages -> a clipped policy-gradient loss.

Public API (arrays are padded `[B, T]` with a float mask; groups are contiguous rows):
    advantages(rewards, group_size, estimator)          grpo | rloo | reinforce
    kl_penalized_rewards(rewards, sample_lp, ref_lp, mask, beta)
    policy_loss(logprobs, mask, advantages, ...)       -> (loss, aux)
    token_logprobs(logits, tokens, temperature)          per-token log pi, aligned with tokens
    score_shaped_reward(r1, r2, alpha)                   SCoRe: r2 + alpha * (r2 - r1)
    self_correction_metrics(correct_t1, correct_t2)      acc_t1, acc_t2, delta, delta_i2c, delta_c2i
    latro_advantages(answer_lp, rationale_lp, ref_rationale_lp, stopped, group_size, beta)
                                                         LaTRO: (RLOO advantages, self-rewards), per sample [B*K]
    latro_loss(advantages, rationale_lp, answer_lp, sft_penalty)   -> (loss, aux)
"""

from glore_jax.rl.advantages import ESTIMATORS, advantages, kl_penalized_rewards
from glore_jax.rl.losses import (AGGREGATIONS, KL_ESTIMATORS, RATIO_LEVELS, policy_loss, policy_loss_terms,
                                 token_entropy, token_logprobs)
from glore_jax.rl.latro import latro_advantages, latro_loss, latro_loss_terms
from glore_jax.rl.score import score_shaped_reward, self_correction_metrics, turn_advantages

__all__ = ["AGGREGATIONS", "ESTIMATORS", "KL_ESTIMATORS", "RATIO_LEVELS", "advantages", "kl_penalized_rewards", "latro_advantages", "latro_loss", "latro_loss_terms",
           "policy_loss", "policy_loss_terms", "score_shaped_reward", "self_correction_metrics", "token_entropy",
           "token_logprobs", "turn_advantages"]
