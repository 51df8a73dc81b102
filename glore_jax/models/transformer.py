"""The shared backbone and its heads, as one pure-functional flax.linen module.

Params layout (float32), with L layers stacked on a leading 'layers' axis:
  backbone/embedding              [V, E]
  backbone/layers/attn/{q,k,v,o}  [L, E, H|KVH, D] / [L, H, D, E]
  backbone/layers/mlp/{gate,up}   [L, E, F];  down [L, F, E]
  backbone/layers/{attn,mlp}_norm/scale [L, E]
  backbone/final_norm/scale       [E]
  lm_head/kernel                  [E, V]   (absent when embeddings are tied)
  value_head/{kernel [E], bias []}

The KV cache is an explicit `KVCache` pytree passed in and returned, never a
mutable flax collection, so samplers can donate it and shard it like any array.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from glore_jax.models.config import ModelConfig
from glore_jax.models.layers import Block, RMSNorm, dense, param, rope_angles, write_slots
from glore_jax.sharding import constrain

# Logical axes of the stacked k [L, B, KVH, D, S] and v [L, B, KVH, S, D] (see `layers.Attention`).
CACHE_K_AXES = ("layers", "activation_batch", "activation_kv_heads", "activation_head_dim", "cache_length")
CACHE_V_AXES = ("layers", "activation_batch", "activation_kv_heads", "cache_length", "activation_head_dim")


@flax.struct.dataclass
class KVCache:
    """Keys/values for every layer plus the position held in each slot (-1 = empty).

    k: [L, B, KVH, D, S] and v: [L, B, KVH, S, D] in the compute dtype (keys
    slots-minor, see `layers.Attention`); pos: [B, S] int32.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int) -> "KVCache":
        c = config
        return cls(k=jnp.zeros((c.num_layers, batch, c.num_kv_heads, c.head_dim, length), c.compute_dtype),
                   v=jnp.zeros((c.num_layers, batch, c.num_kv_heads, length, c.head_dim), c.compute_dtype),
                   pos=jnp.full((batch, length), -1, jnp.int32))

    @property
    def length(self) -> int:
        return self.pos.shape[1]


@flax.struct.dataclass
class ModelOutput:
    hidden: jax.Array                 # [B, T, E] final-normed hidden states
    logits: jax.Array | None = None   # [B, T, V] float32
    values: jax.Array | None = None   # [B, T] float32 value logits (sigmoid -> P(correct))
    cache: KVCache | None = None


class Backbone(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedding = param(self, "embedding", (c.vocab_size, c.embed_dim), ("vocab", "embed"))
        block = nn.remat(Block) if c.remat else Block
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            # Shallow models unroll: XLA:CPU copies each layer's slice of the stacked
            # residuals and grads inside a rolled loop (~11% of a demo-model train
            # step). Deep ones keep the loop, whose compile time does not grow with depth.
            unroll=c.num_layers if c.num_layers <= 8 else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c)
        self.final_norm = RMSNorm(c.norm_eps, c.compute_dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 cache: KVCache | None, cache_index: jax.Array | None, return_kv: bool):
        x = self.embed(tokens)
        if cache is not None and segment_ids is not None:
            raise ValueError("Packed segments are a training-time layout; they cannot use a KV cache")
        context = None if cache is None else ((cache.k, cache.v),)
        context_pos = None if cache is None else (cache.pos,)
        rotary = rope_angles(positions, self.config.head_dim, self.config.rope_theta)  # once for all layers
        x, (k, v) = self.layers(x, context, positions, segment_ids, context_pos, None, rotary)
        x = self.finish(x)
        if cache is not None:
            # One in-place write of every layer's new keys, after the scan.
            return x, KVCache(k=write_slots(cache.k, k, cache_index, 4), v=write_slots(cache.v, v, cache_index, 3),
                              pos=write_slots(cache.pos, positions.astype(jnp.int32), cache_index, 1))
        if return_kv:
            return x, KVCache(k=k, v=v, pos=positions.astype(jnp.int32))
        return x, None

    def embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.config.compute_dtype)
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    def finish(self, x: jax.Array) -> jax.Array:
        """The final norm, for callers that run the layers themselves (see `decoding`)."""
        return self.final_norm(x)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied-embedding logits: hidden [B, T, E] -> float32 [B, T, V]."""
        b, t, e = x.shape
        return dense(x.reshape(b * t, e), self.embedding.T, x.dtype).reshape(b, t, -1)


class LanguageModel(nn.Module):
    """Backbone plus the heads named in `config.heads`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 cache_index: jax.Array | int | None = None, *, want_logits: bool = True,
                 want_values: bool = True, return_kv: bool = False) -> ModelOutput:
        """tokens, positions, segment_ids: [B, T] int. Padding tokens get position -1.

        With a cache, this call's tokens attend to every filled slot at or
        before their own position, and are written at slot `cache_index`.
        `return_kv` without a cache returns this call's keys/values as a
        KVCache of length T (the sampler's prefill, `decoding.prefill`, runs
        the layers itself to skip work it does not need).
        """
        c = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if cache is not None and cache_index is None:
            raise ValueError("cache_index is required when a cache is given")
        cache_index = None if cache is None else jnp.asarray(cache_index, jnp.int32)
        backbone = Backbone(c, name="backbone")
        hidden, cache = backbone(tokens, positions, segment_ids, cache, cache_index, return_kv)
        logits = values = None
        if "lm" in c.heads and (want_logits or self.is_initializing()):
            logits = backbone.attend(hidden) if c.tie_embeddings else LMHead(c, name="lm_head")(hidden)
            logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        if "value" in c.heads and (want_values or self.is_initializing()):
            values = ValueHead(c, name="value_head")(hidden)
        return ModelOutput(hidden=hidden, logits=logits, values=values, cache=cache)


class LMHead(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        kernel = param(self, "kernel", (c.embed_dim, c.vocab_size), ("embed", "vocab"))
        b, t, e = hidden.shape
        return dense(hidden.reshape(b * t, e), kernel, hidden.dtype).reshape(b, t, -1)


class ValueHead(nn.Module):
    """A scalar per token: the logit of P(final answer correct | prefix)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        kernel = param(self, "kernel", (c.embed_dim,), ("embed",))
        bias = param(self, "bias", (), (), nn.initializers.zeros)
        return jnp.einsum("bte,e->bt", hidden, kernel.astype(hidden.dtype),
                          preferred_element_type=jnp.float32) + bias
