"""Jitted forward passes: the public one-liners and mesh-aware compiled functions."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from glore_jax import sharding as shd
from glore_jax.models.config import ModelConfig
from glore_jax.models.params import Params, param_shardings
from glore_jax.models.transformer import KVCache, LanguageModel, ModelOutput


def apply(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None,
          segment_ids: jax.Array | None = None, cache: KVCache | None = None,
          cache_index: jax.Array | int | None = None, *, want_logits: bool = True,
          want_values: bool = True, return_kv: bool = False) -> ModelOutput:
    """Un-jitted model call; embed it in your own jitted step. See `LanguageModel.__call__`."""
    return LanguageModel(config).apply({"params": params}, tokens, positions, segment_ids, cache,
                                       cache_index, want_logits=want_logits, want_values=want_values,
                                       return_kv=return_kv)


@functools.partial(jax.jit, static_argnums=0)
def policy_logits(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Float32 logits [B, T, V] of a causal forward over int tokens [B, T] (no padding)."""
    if "lm" not in config.heads:
        raise ValueError(f"policy_logits needs an 'lm' head; config.heads={config.heads}")
    return apply(config, params, tokens, want_values=False).logits


def make_forward(config: ModelConfig, mesh: Mesh, rules: Sequence[tuple[str, Any]] = shd.LOGICAL_RULES,
                 *, want_values: bool = False):
    """A `jax.jit` forward with explicit in/out shardings on `mesh`.

    Returns f(params, tokens [B,T], positions [B,T]) -> logits [B,T,V] (or values [B,T]).
    Activations inside carry the logical constraints of the rules table.
    """
    p_shard = param_shardings(config, mesh, rules)
    tok_shard = shd.batch_sharding(mesh, 2, rules)
    out_axes = ("activation_batch", "activation_length") + (() if want_values else ("activation_vocab",))
    out_shard = shd.logical_sharding(out_axes, mesh, rules)

    def fwd(params, tokens, positions):
        with shd.activation_rules(mesh, rules):
            out = apply(config, params, tokens, positions, want_logits=not want_values,
                        want_values=want_values)
        return out.values if want_values else out.logits

    return jax.jit(fwd, in_shardings=(p_shard, tok_shard, tok_shard), out_shardings=out_shard)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions 0..n-1 over real tokens and -1 on padding, from a [B, T] bool/int mask."""
    mask = mask.astype(bool)
    return jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, -1).astype(jnp.int32)


def next_token_nll(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, T, V] logits, [B, T] tokens -> float32 [B, T] -log p(tokens[t+1] | <= t), and [B, T] top-1 hits.

    Position T-1 has no next token: it gets a finite dummy loss, for the mask to
    zero. A hit is "the target's logit is the largest", so a tie counts as a hit.
    Why not `optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ...)`
    and an argmax: on XLA:CPU the slice's gradient is a pad of the whole
    [B, T, V] gradient, the label gather's a scatter, and argmax a two-output
    reduce; together ~25 ms of a ~200 ms demo-model train step (2-core EPYC).
    Here everything is elementwise work and plain max/sum reductions.
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    log_norm = jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)) + top
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    label = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    return log_norm - label, label >= top
