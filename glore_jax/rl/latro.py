"""LaTRO: the model's own likelihood of the gold answer, given a sampled rationale, is the reward.

Chen et al. 2024, "Language Models are Hidden Reasoners: Unlocking Latent
Reasoning Capabilities via Self-Rewarding"; the semantics are those of the
official code (SalesforceAIResearch/LaTRO, `LatroTrainer.train`). For each
question x, K rationales z_k ~ pi(.|x) are sampled, and y is the answer
string of a `latro` prompt format ("The answer is {gold}." + EOS):

    r_k = sum_t log pi(y_t | x, z_k, y_<t)              the self-reward, teacher-forced
    r_k = m * mean(r)  if z_k never stopped             m = 2; the mean over the whole batch (all x, all k)
    R_k = r_k - beta * (sum log pi(z_k|x) - sum log pi_0(z_k|x))     KL to the reference, on the rationale
    A_k = R_k - mean_{j != k} R_j                        RLOO, within the question's group
    loss = mean_k[-sg(A_k) sum log pi(z_k|x)] + sft_penalty * mean_k[-r_k]

r is negative (a log-likelihood), so the non-stop "penalty" of twice the
batch mean is a reward well below the typical one. Gradients: the
policy-gradient term treats A as a constant (it is computed at sampling
time, from the same params, since each batch is used once); the
`sft_penalty` term is the answer's log-likelihood recomputed with
gradient, as the official code does, so with sft_penalty > 0 the model
also learns to say y after its own rationales. With the default 0 no
gradient reaches r.

One deviation, on purpose: the official code's reward sums the answer's
log-probs from one position early, so its r_k also holds log pi of the
rationale's last token. Here r_k is the answer's tokens only (`span="clean"`),
so a rationale is not rewarded for how likely its own last token was;
`latro.answer_span=official` restores the official span.

Arrays are per-sample sums `[B*K]`, groups of K contiguous. Given numpy
arrays or lists the functions compute in float64 numpy; given jax arrays
(inside jit), in jax.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glore_jax.prompts import LATRO_ANSWERS
from glore_jax.rl.losses import token_logprobs
from glore_jax.tokenizer import Tokenizer

ANSWER_FORMATS = tuple(LATRO_ANSWERS)


def _namespace(*arrays):
    """jax.numpy if any input is a jax array (or a tracer), else numpy in float64."""
    if any(isinstance(a, jax.Array) for a in arrays):
        return jnp, [jnp.asarray(a, jnp.float32) for a in arrays]
    return np, [np.asarray(a, np.float64) for a in arrays]


def latro_advantages(answer_logprob, rationale_logprob, ref_rationale_logprob, stopped, group_size: int,
                     beta: float, *, non_stop_penalty: bool = True, penalty_multiplier: float = 2.0):
    """(advantages A_k, rewards r_k): RLOO advantages of the KL-adjusted self-reward, and the self-reward
    after the non-stop penalty (module doc). All inputs are `[B*K]`; `stopped` is bool."""
    xp, (r, lp, ref) = _namespace(answer_logprob, rationale_logprob, ref_rationale_logprob)
    r, lp, ref = r.reshape(-1), lp.reshape(-1), ref.reshape(-1)
    stopped = (jnp if xp is jnp else np).asarray(stopped).astype(bool).reshape(-1)
    n = r.shape[0]
    if not (lp.shape[0] == ref.shape[0] == stopped.shape[0] == n):
        raise ValueError(f"latro_advantages: inputs must all have B*K values, got {n}, {lp.shape[0]}, "
                         f"{ref.shape[0]} and {stopped.shape[0]}")
    if group_size < 2 or n % group_size:
        raise ValueError(f"latro_advantages: group_size must be >= 2 (RLOO leaves one out) and divide {n}, "
                         f"got {group_size}")
    if non_stop_penalty:  # the mean of every sample's r, before any is replaced (as the official code)
        r = xp.where(stopped, r, penalty_multiplier * xp.mean(r))
    adjusted = (r - beta * (lp - ref)).reshape(-1, group_size)
    baseline = (adjusted.sum(axis=1, keepdims=True) - adjusted) / (group_size - 1)
    return (adjusted - baseline).reshape(-1), r


def latro_loss_terms(advantages, rationale_logprob, answer_logprob, sft_penalty: float):
    """((loss_sum, count), aux_sums): `latro_loss` as sums, for gradient accumulation (`objectives.base`)."""
    xp, (adv, lp, r) = _namespace(advantages, rationale_logprob, answer_logprob)
    adv = jax.lax.stop_gradient(adv) if xp is jnp else adv
    pg, sft = xp.sum(-adv * lp), xp.sum(-r)
    n = xp.asarray(lp.shape[0], lp.dtype)
    return (pg + sft_penalty * sft, n), {"policy_loss": (pg, n), "sft_loss": (sft, n)}


def latro_loss(advantages, rationale_logprob, answer_logprob, sft_penalty: float = 0.0):
    """(loss, aux): mean over samples of -sg(A) * sum log pi(z|x), plus sft_penalty * mean(-r).
    aux holds the two terms apart, `policy_loss` and `sft_loss`."""
    (total, n), aux = latro_loss_terms(advantages, rationale_logprob, answer_logprob, sft_penalty)
    return total / n, {k: s / c for k, (s, c) in aux.items()}


def sequence_logprobs(logits: jax.Array, tokens: jax.Array, rationale_mask: jax.Array, answer_mask: jax.Array,
                      temperature: float) -> tuple[jax.Array, jax.Array]:
    """`[B]` sums: log pi(z|x) under the sampling distribution (logits / T), and log pi(y|x, z) under the
    model itself (T = 1: the self-reward is the model's likelihood, whatever the rationale was sampled at)."""
    rationale = jnp.sum(token_logprobs(logits, tokens, temperature) * rationale_mask, axis=1)
    answer = jnp.sum(token_logprobs(logits, tokens, 1.0) * answer_mask, axis=1)
    return rationale, answer


def truncate_rationale(tok: Tokenizer, tokens: Sequence[int], stops: Sequence[str]) -> tuple[list[int], bool]:
    """(rationale, stopped): the sampled tokens before the first EOS or stop string (both dropped), and
    whether one occurred. A stop string cut off by the length limit does not count.

    Stops are found in the decoded text, not as token sequences: in context a marker such as "####" can
    split into other pieces than on its own. The token where the stop string begins is dropped whole.
    """
    ids = list(tokens)
    stopped = tok.eos_id in ids
    if stopped:
        ids = ids[:ids.index(tok.eos_id)]
    text = tok.decode(ids)
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not found:
        return ids, stopped
    start = min(found)
    lo, hi = 0, len(ids)  # the first k with decode(ids[:k]) reaching past `start`: that token holds it
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tok.decode(ids[:mid + 1])) > start:
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo], True


def sequence(prompt: Sequence[int], rationale: Sequence[int], answer: Sequence[int],
             span: str = "clean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, rationale_mask, answer_mask) of x + z + y, masks aligned with `rl.token_logprobs`.

    `clean`: the answer mask is y's positions only, so its log-prob sum is log pi(y|x, z).
    `official`: also the rationale's last position (the prompt's last when z is empty), as the official
    code's off-by-one context length gives.
    """
    p, z = len(prompt), len(rationale)
    tokens = np.asarray(list(prompt) + list(rationale) + list(answer), np.int32)
    rationale_mask, answer_mask = np.zeros(len(tokens), np.float32), np.zeros(len(tokens), np.float32)
    rationale_mask[p:p + z] = 1.0
    answer_mask[p + z:] = 1.0
    if span == "official":
        answer_mask[p + z - 1] = 1.0
    elif span != "clean":
        raise ValueError(f"span must be 'clean' or 'official', got {span!r}")
    return tokens, rationale_mask, answer_mask
