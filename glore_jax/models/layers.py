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
    def __call__(self, x: jax.Array, positions: jax.Array, mask_fn, kv: tuple | None,
                 cache_index: jax.Array | None):
        """x: [B, T, E]. kv: this layer's cache (k, v), each [B, S, KVH, D], or None.

        Returns (out [B, T, E], updated kv or None).
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

        if kv is not None:
            # Write this call's keys/values into the preallocated cache at
            # `cache_index`; attention then reads the whole cache and the
            # position mask hides empty slots and the future.
            ck, cv = kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            kv = (k, v)

        b, t, _, d = q.shape
        g = c.num_heads // c.num_kv_heads
        qg = q.reshape(b, t, c.num_kv_heads, g, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(dt),
                            preferred_element_type=jnp.float32) * (d ** -0.5)
        mask = mask_fn()  # [B, T, S]
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dt)).reshape(b, t, c.num_heads, d)
        out = constrain(out, ("activation_batch", "activation_length", "activation_heads",
                              "activation_head_dim"))
        out = jnp.einsum("bthd,hde->bte", out, wo.astype(dt))
        return constrain(out, ("activation_batch", "activation_length", "activation_embed")), kv


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
    def __call__(self, x: jax.Array, kv: tuple | None, positions: jax.Array, k_pos: jax.Array,
                 segment_ids: jax.Array | None, k_seg: jax.Array | None, cache_index: jax.Array | None):
        c = self.config
        # The mask is built inside the layer (cheap, fused by XLA) so the scan
        # carries no [B, T, S] tensor.
        mask_fn = lambda: attention_mask(positions, k_pos, segment_ids, k_seg, c.sliding_window)
        h, kv = Attention(c, name="attn")(RMSNorm(c.norm_eps, c.compute_dtype, name="attn_norm")(x),
                                          positions, mask_fn, kv, cache_index)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.norm_eps, c.compute_dtype, name="mlp_norm")(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed")), kv
