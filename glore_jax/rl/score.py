"""SCoRe's arithmetic: the shaped reward, per-turn advantages and KL weights, and self-correction metrics.

SCoRe (Kumar et al. 2024, "Training Language Models to Self-Correct via
Reinforcement Learning") trains one policy on two-turn episodes: y1 answers
the question, y2 answers again after a fixed self-correction instruction
(`prompts.SELF_CORRECT_INSTRUCTION`). Both turns live in one sequence, and
`turn_ids` (1 on y1's sampled tokens, 2 on y2's, 0 elsewhere) says which
weights a token gets:

    stage 1 (initialisation)  turn 1: no policy-gradient term, KL weight beta2 (strong: keep y1 as it was)
                              turn 2: advantage of r(y2), KL weight beta1
    stage 2 (joint)           turn 1: advantage of r(y1) + r(y2), KL weight beta1
                              turn 2: advantage of r^(y2), KL weight beta1
    with r^(y2) = r(y2) + alpha * (r(y2) - r(y1)).

The bonus is the second attempt's alone. Turn 1's return could also carry
it (`turn1_return="shaped"`: r(y1) + r^(y2) = (1 - alpha) r(y1) + (1 + alpha)
r(y2), the literal sum of both turns' rewards), but then turn 1 is paid
-(alpha - 1) for being right, an incentive to fail first so as to collect the
bonus: on the demo policy (alpha = 10) turn-1 accuracy in the training batches
fell from ~50% to 0-3% within 35 steps, and turn 2 with it. The default,
`"unshaped"`, pays turn 1 for both answers being right and no bonus. Turn
2's return starts at turn 2 (r(y1) is already earned and cannot depend on
y2); a term in r(y1) alone adds variance to its gradient but no bias. Stage
1 exists because plain two-turn RL learns to repeat y1 (an edit risks a
right answer); the alpha bonus pays for changing wrong to right and charges
for the reverse, so a no-edit policy gains nothing from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from glore_jax.errors import ConfigError
from glore_jax.rl.advantages import advantages


def _reward(x):
    # Rewards may arrive as floats, bools (correct or not), lists or arrays; jax arrays stay jax (in a loss).
    if isinstance(x, jax.Array):
        return x.astype(jnp.float32) if x.dtype == jnp.bool_ else x
    return np.asarray(x, np.float64) if np.ndim(x) else float(x)


def score_shaped_reward(r1, r2, alpha: float):
    """r^(y2) = r2 + alpha * (r2 - r1): the turn-2 reward with SCoRe's progress bonus (elementwise)."""
    r1, r2 = _reward(r1), _reward(r2)
    return r2 + alpha * (r2 - r1)


def self_correction_counts(correct_t1, correct_t2) -> dict:
    """Sums over problems (jnp, so a loss can log them as (sum, count) pairs): right at t1, at t2,
    wrong -> right, right -> wrong."""
    c1, c2 = jnp.asarray(correct_t1, jnp.float32), jnp.asarray(correct_t2, jnp.float32)
    return {"acc_t1": jnp.sum(c1), "acc_t2": jnp.sum(c2), "delta": jnp.sum(c2 - c1),
            "delta_i2c": jnp.sum((1.0 - c1) * c2), "delta_c2i": jnp.sum(c1 * (1.0 - c2))}


def self_correction_metrics(correct_t1, correct_t2) -> dict[str, float]:
    """Acc@t1, Acc@t2, delta = Acc@t2 - Acc@t1, and the shares of problems wrong->right (delta_i2c) and
    right->wrong (delta_c2i), all fractions of the problems given (one boolean per problem and turn)."""
    c1, c2 = np.asarray(correct_t1, np.float32).reshape(-1), np.asarray(correct_t2, np.float32).reshape(-1)
    if c1.shape != c2.shape or c1.size == 0:
        raise ValueError(f"need one turn-1 and one turn-2 outcome per problem, got {c1.size} and {c2.size}")
    return {k: float(v) / c1.size for k, v in self_correction_counts(c1, c2).items()}


def turn_advantages(r1, r2, *, stage: int, alpha: float, group_size: int, estimator: str,
                    turn1_return: str = "unshaped"):
    """(turn-1, turn-2) advantages `[B]` of rewards `[B]` in contiguous groups (module doc's table)."""
    r1, r2 = jnp.asarray(r1, jnp.float32), jnp.asarray(r2, jnp.float32)
    if stage == 1:
        return jnp.zeros_like(r1), advantages(r2, group_size, estimator)
    if stage != 2:
        raise ConfigError(f"score.stage must be 1 or 2, got {stage!r}")
    shaped = score_shaped_reward(r1, r2, alpha)
    first = r1 + (shaped if turn1_return == "shaped" else r2)
    return advantages(first, group_size, estimator), advantages(shaped, group_size, estimator)


def token_weights(turn_ids, adv_t1, adv_t2, *, stage: int, beta1: float, beta2: float):
    """(advantage, KL weight), each `[B, T]`: each turn's tokens get their turn's values, others 0.

    In stage 1 turn 1 gets no advantage whatever `adv_t1` holds: its only gradient is the KL's.
    """
    turn = jnp.asarray(turn_ids)
    t1, t2 = turn == 1, turn == 2
    if stage == 1:
        adv_t1 = jnp.zeros_like(jnp.asarray(adv_t1, jnp.float32))
    adv = jnp.where(t1, jnp.asarray(adv_t1)[:, None], 0.0) + jnp.where(t2, jnp.asarray(adv_t2)[:, None], 0.0)
    beta = jnp.where(t1, beta2 if stage == 1 else beta1, 0.0) + jnp.where(t2, beta1, 0.0)
    return adv.astype(jnp.float32), beta.astype(jnp.float32)
