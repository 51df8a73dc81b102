"""Llama-family building blocks: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP.

Every param is created with logical axis names (see `glore_jax.sharding`), and
every key activation is constrained with logical names, so one rules table
decides the parallel layout. Params are float32; matmuls run in the config's
compute dtype; norms, softmax and rotary phases stay in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glore_jax.models.config import ModelConfig
from glore_jax.sharding import constrain

_INIT = nn.initializers.normal(stddev=0.02)
_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
          init=_INIT) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split convention (as in HF Llama). x: [B, T, N, D], positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    phase = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(phase)[:, :, None, :]
    sin = jnp.sin(phase)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


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


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 context: tuple | None, context_pos: tuple | None, write_slot: jax.Array | None = None):
        """x: [B, T, E]; context: cached (k, v) segments, each [Bs, KVH, S, D].

        Attends jointly (one softmax) over every context segment, whose slots are
        visible by `context_pos` ([Bs, S] each, -1 = empty), and this call's own
        tokens. A segment with Bs < B rows is shared: its row n serves query rows
        n*r .. n*r+r-1 (r = B // Bs). That is how K rollouts read one copy of
        their prefix, and it turns their K one-token queries into one matmul.

        Without `write_slot`, the context is read-only and this returns (out
        [B, T, E], this call's (k, v) [B, KVH, T, D]) for the caller to store.
        With it, this call's keys are first written into the last segment at
        that slot (whose `context_pos` must already hold their positions), then
        read from there, and the updated last segment is returned instead.
        Writing before reading is what lets XLA update a while-loop's cache in
        place: a read of the old buffer after the write would force a copy.
        """
        c = self.config
        dt = c.compute_dtype
        wq = param(self, "q", (c.embed_dim, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"))
        wk = param(self, "k", (c.embed_dim, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
        wv = param(self, "v", (c.embed_dim, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
        wo = param(self, "o", (c.num_heads, c.head_dim, c.embed_dim), ("heads", "head_dim", "embed"))

        x = x.astype(dt)
        q = jnp.einsum("bte,ehd->bthd", x, wq.astype(dt))
        k = jnp.einsum("bte,ehd->bthd", x, wk.astype(dt))
        v = jnp.einsum("bte,ehd->bthd", x, wv.astype(dt))
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads",
                          "activation_head_dim"))
        q = apply_rope(q, positions, c.rope_theta)
        k = apply_rope(k, positions, c.rope_theta)

        b, t, _, d = q.shape
        kvh, g = c.num_kv_heads, c.num_heads // c.num_kv_heads
        qg = q.reshape(b, t, kvh, g, d) * jnp.asarray(d ** -0.5, dt)

        # Keys/values are kept [B, KVH, S, D]: batch dims lead and each head's
        # slots are contiguous, so attention reads the cache without a transpose.
        k = k.transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)

        def scores(keys, mask):
            """-> [B, KVH, G, T, S] float32, masked."""
            bs, s_len = keys.shape[0], keys.shape[2]
            keys = keys.astype(dt)
            if bs != b:
                qs = qg.reshape(bs, b // bs, t, kvh, g, d)
                s = jnp.einsum("nrtkgd,nksd->nrkgts", qs, keys, preferred_element_type=jnp.float32)
                s = s.reshape(b, kvh, g, t, s_len)
            elif t == 1:
                # A one-token step is a matrix-vector product per (row, head):
                # XLA:CPU runs it far faster as a fused multiply-reduce than as
                # a batched dot with M=1 (measured 2.4x on the demo preset).
                # Products are formed in float32, as a dot with float32 accumulation
                # would; CPUs have no bfloat16 arithmetic to save anyway.
                f32 = jnp.float32
                s = jnp.sum(qg[:, 0, :, :, None, :].astype(f32) * keys[:, :, None].astype(f32), -1)[:, :, :, None]
            else:
                s = jnp.einsum("btkgd,bksd->bkgts", qg, keys, preferred_element_type=jnp.float32)
            return jnp.where(mask[:, None, None, :, :], s, _NEG_INF)

        def mix(probs, values):
            """probs [B, KVH, G, T, S] -> [B, T, KVH, G, D]."""
            bs, s_len = values.shape[0], values.shape[2]
            values = values.astype(dt)
            if bs != b:
                ps = probs.reshape(bs, b // bs, kvh, g, t, s_len)
                return jnp.einsum("nrkgts,nksd->nrtkgd", ps, values).reshape(b, t, kvh, g, d)
            if t == 1:
                f32 = jnp.float32
                out = jnp.sum(probs[:, :, :, 0, :, None].astype(f32) * values[:, :, None].astype(f32), axis=-2)
                return out[:, None].astype(dt)
            return jnp.einsum("bkgts,bksd->btkgd", probs, values)

        context, returned = list(context or ()), (k, v)
        if write_slot is not None:
            put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), write_slot, 2)
            ck, cv = context[-1]
            context[-1] = returned = (put(ck, k), put(cv, v))
        segments = []
        for (ck, cv), cpos in zip(context, context_pos or ()):
            cpos = jnp.repeat(cpos, b // cpos.shape[0], axis=0) if cpos.shape[0] != b else cpos
            segments.append((ck, cv, attention_mask(positions, cpos, None, None, c.sliding_window)))
        if write_slot is None:
            segments.append((k, v, attention_mask(positions, positions, segment_ids, segment_ids,
                                                  c.sliding_window)))
        s_all = [scores(sk, mask) for sk, _, mask in segments]
        probs = jax.nn.softmax(jnp.concatenate(s_all, axis=-1), axis=-1).astype(dt)
        out, start = 0.0, 0
        for (_, sv, _), s in zip(segments, s_all):
            out = out + mix(probs[..., start:start + s.shape[-1]], sv)
            start += s.shape[-1]
        out = constrain(out.reshape(b, t, c.num_heads, d),
                        ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        out = jnp.einsum("bthd,hde->bte", out, wo.astype(dt))
        return constrain(out, ("activation_batch", "activation_length", "activation_embed")), returned


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dt = c.compute_dtype
        gate = param(self, "gate", (c.embed_dim, c.mlp_dim), ("embed", "mlp"))
        up = param(self, "up", (c.embed_dim, c.mlp_dim), ("embed", "mlp"))
        down = param(self, "down", (c.mlp_dim, c.embed_dim), ("mlp", "embed"))
        x = x.astype(dt)
        h = jax.nn.silu(x @ gate.astype(dt)) * (x @ up.astype(dt))
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        out = h @ down.astype(dt)
        return constrain(out, ("activation_batch", "activation_length", "activation_embed"))


class Block(nn.Module):
    """One pre-norm decoder layer; scanned over depth by the backbone."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: tuple | None, positions: jax.Array,
                 segment_ids: jax.Array | None, context_pos: tuple | None, write_slot: jax.Array | None = None):
        """context: this layer's cached (k, v) segments; context_pos: their slot positions (see Attention)."""
        c = self.config
        h, kv = Attention(c, name="attn")(RMSNorm(c.norm_eps, c.compute_dtype, name="attn_norm")(x),
                                          positions, segment_ids, context, context_pos, write_slot)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.norm_eps, c.compute_dtype, name="mlp_norm")(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed")), kv
