"""The attention core: the mask rule, softmax over cache segments, and the training/prefill kernel.

`Attention` (in `layers`) projects, rotates and lays out q, k and v; this
module holds what happens between them: which keys each query may see
(`attention_mask`), the softmax over several cache segments at once
(`joint_softmax`), and the no-cache path of training and prefill
(`causal_self_attention`: a hand-written gradient, and query blocks that skip
the keys after them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
                   k_seg: jax.Array | None, sliding_window: int | None) -> jax.Array:
    """[B, T, S] bool mask from token positions.

    Causality is by position, not slot index: a key is visible iff it is a real
    token (position >= 0) at or before the query's position (and in the same
    packed segment, and inside the sliding window). Padding carries position -1.
    This one rule serves training, ragged prefill and cached decode alike.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        mask &= kp > qp - sliding_window
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def joint_softmax(scores: list[jax.Array]) -> list[jax.Array]:
    """Softmax over the last axis of the scores' concatenation, returned per part, without concatenating."""
    if len(scores) == 1:
        return [jax.nn.softmax(scores[0], axis=-1)]  # its custom gradient is cheaper than the general form's
    top = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores])
    unnormalised = [jnp.exp(s - top) for s in scores]
    total = sum(jnp.sum(e, axis=-1, keepdims=True) for e in unnormalised)
    return [e / total for e in unnormalised]


def _scores_to_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, KVH, G, T, D], k [B, KVH, D, S], mask [B, T, S] -> float32 probs [B, KVH, G, T, S]."""
    b, kvh, g, t, d = q.shape
    s = jnp.einsum("nkmd,nkds->nkms", q.reshape(b, kvh, g * t, d), k, preferred_element_type=jnp.float32)
    s = jnp.where(mask[:, None, None], s.reshape(b, kvh, g, t, -1), NEG_INF)
    return jax.nn.softmax(s, axis=-1)


@jax.custom_vjp
def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k + mask) v for training and prefill: q [B, KVH, G, T, D], k [B, KVH, D, S], v [B, KVH, S, D].

    Returns float32 [B, KVH, G, T, D]. Why a hand-written gradient: the score
    tensor [B, H, T, S] is the largest in the step (16-33 MB per layer on the
    demo model, against 3-4 MB of activations), and autodiff's backward of
    mask -> softmax -> matmul passes over it several times more than the
    textbook form does (dS = P * (dP - rowsum(dO * O))). On XLA:CPU (2-core
    Xeon) this cut the attention's own forward+backward by ~30% in isolation,
    but the demo model's whole train step by only 1-4% (15.5k against 15.3k
    tokens/s at 176 tokens, 13.3k against 12.8k at 256, alternating runs).
    """
    return _self_attention_fwd(q, k, v, mask)[0]


def _self_attention_fwd(q, k, v, mask):
    p = _scores_to_probs(q, k, mask)
    b, kvh, g, t, d = q.shape
    o = jnp.einsum("nkms,nksd->nkmd", p.reshape(b, kvh, g * t, -1).astype(v.dtype), v,
                   preferred_element_type=jnp.float32).reshape(b, kvh, g, t, d)
    return o, (q, k, v, p, o, mask)


def _self_attention_bwd(res, do):
    q, k, v, p, o, mask = res
    b, kvh, g, t, d = q.shape
    dt = v.dtype
    rows = lambda x: x.reshape(b, kvh, g * t, x.shape[-1])  # noqa: E731
    dv = jnp.einsum("nkms,nkmd->nksd", rows(p).astype(dt), rows(do).astype(dt), preferred_element_type=jnp.float32)
    dp = jnp.einsum("nkmd,nksd->nkms", rows(do).astype(dt), v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do * o, axis=-1, keepdims=True)  # = rowsum(P * dP), read from the small tensors
    # Masked slots get no gradient, as through `where`: a fully masked row (padding) has uniform P.
    ds = jnp.where(mask[:, None, None], p * (dp.reshape(p.shape) - delta), 0.0)
    dq = jnp.einsum("nkms,nkds->nkmd", rows(ds).astype(dt), k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("nkms,nkmd->nkds", rows(ds).astype(dt), rows(q), preferred_element_type=jnp.float32)
    return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            np.zeros(mask.shape, jax.dtypes.float0))


self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)


# Query blocks of about QUERY_BLOCK tokens (at most MAX_QUERY_BLOCKS): see `causal_self_attention`.
QUERY_BLOCK = 96
MAX_QUERY_BLOCKS = 8


def query_block_edges(t: int, block: int | None = None) -> list[int]:
    """Slot boundaries of ceil(t / block) near-equal query blocks (at most MAX_QUERY_BLOCKS): [0, .., t]."""
    n = max(1, min(MAX_QUERY_BLOCKS, math.ceil(t / (block or QUERY_BLOCK))))
    return [round(t * i / n) for i in range(n + 1)]


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          block: int | None = None) -> jax.Array:
    """`self_attention` for rows that are causal in slot order, by query blocks that skip later keys.

    Shapes as `self_attention`'s, with T == S (queries and keys are the same
    slots). Query block [lo, hi) attends to keys [0, hi) only: under a causal
    mask the keys after a block are invisible to all of its queries, so their
    scores, softmax and gradient are work thrown away. Two blocks skip a
    quarter of the [T, S] work, three a third. Why not more: each block is
    another set of small kernels. On XLA:CPU (2-core AMD EPYC Zen 5, the demo
    model's float32 train step, two XLA devices, alternating in one process,
    2026-12-04): 176 tokens, 2 blocks 1.05-1.08x, 3 blocks 1.03-1.06x, 4 blocks
    1.03x, 8 blocks 0.93x; 256 tokens, 2 blocks 1.09x, 3 blocks 1.14-1.21x; bf16
    at 176 tokens 1.01-1.03x (2 blocks), 0.96x (3). Hence blocks of ~QUERY_BLOCK
    tokens. The cost is compile time: each block is its own kernels (a 224-token
    prefill compiled in 0.97 s against 0.83 s, and ran 1.21x faster).

    Exact for every query whose visible keys lie at or before its own slot:
    every real token of a training row (packed or not: documents are
    contiguous and positions rise within one) and of a prefill. Padding may
    see later padding (training pads share position 0 and segment 0); its
    outputs, which no real token reads and no loss weighs, can differ.
    """
    t = q.shape[3]
    edges = query_block_edges(t, block) if t == k.shape[-1] else [0, t]
    if len(edges) == 2:
        return self_attention(q, k, v, mask)
    outs = [self_attention(q[:, :, :, lo:hi], k[..., :hi], v[:, :, :hi], mask[:, lo:hi, :hi])
            for lo, hi in zip(edges[:-1], edges[1:])]
    return jnp.concatenate(outs, axis=3)
