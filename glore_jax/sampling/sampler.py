"""The jitted sampler: a batched prefill, then a `lax.while_loop` decode over an explicit KV cache.

One batch goes through three compiled programs:
  prefill  prompts [B, P] -> KV cache + logits of each row's last prompt token
  start    (cache, logits) -> SamplingState with the first new token chosen
  decode   SamplingState -> SamplingState, looping until every row stopped

Splitting prefill from start is what makes prefix-shared rollouts cheap: N
prefixes are prefilled once, the cache is repeated K times along the batch,
and K different continuations start from it. Prompts are right-padded; a pad
slot carries position -1, which the attention mask treats as empty.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from glore_jax import sharding as shd
from glore_jax.models import KVCache, ModelConfig, apply, param_shardings
from glore_jax.models.transformer import CACHE_AXES
from glore_jax.sampling.strategy import SamplingStrategy, select


@flax.struct.dataclass
class SamplingState:
    """Everything the decode loop carries. B rows, N = max new tokens."""

    cache: KVCache
    tokens: jax.Array         # [B, N] int32 new tokens; pad_id after a row stops
    logprobs: jax.Array       # [B, N] float32 log p(token) under the raw model distribution
    num_generated: jax.Array  # [B] int32 tokens produced, the stop token included
    done: jax.Array           # [B] bool
    position: jax.Array       # [B] int32 position of the newest token (not yet in the cache)
    keys: jax.Array           # [B] per-row PRNG keys
    step: jax.Array           # [] int32 new tokens produced so far by the longest row
    limit: jax.Array          # [] int32 stop after this many new tokens (<= N)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopCondition:
    """A row stops after emitting `eos_id` or any token in `stop_ids` (e.g. newline pieces)."""

    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()

    def is_stop(self, tokens: jax.Array) -> jax.Array:
        ids = tuple(self.stop_ids) + (() if self.eos_id is None else (self.eos_id,))
        if not ids:
            return jnp.zeros(tokens.shape, bool)
        return jnp.isin(tokens, jnp.asarray(ids, jnp.int32))


def _row_keys(seed: jax.Array, row_ids: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(row_ids)


class Sampler:
    """Compiled sampling programs for one model config on one mesh.

    Batch rows are sharded over the mesh's data-parallel axes ('data', 'fsdp'),
    params follow the rules table. With no mesh, everything runs on one device.
    """

    def __init__(self, config: ModelConfig, *, mesh: Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] = shd.LOGICAL_RULES, pad_id: int = 0,
                 vocab_limit: int | None = None):
        if "lm" not in config.heads:
            raise ValueError(f"Sampling needs an 'lm' head; config.heads={config.heads}")
        self.config = config
        self.mesh = mesh if mesh is not None else shd.single_device_mesh()
        self.rules = rules
        self.pad_id = pad_id
        # Embedding rows past the tokenizer's vocab (padded for even sharding)
        # have no piece; they are never sampled.
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < config.vocab_size else None
        m, r = self.mesh, rules
        self.batch_multiple = int(m.shape["data"] * m.shape["fsdp"])
        self._params = param_shardings(config, m, r)
        row, rows2 = shd.batch_sharding(m, 1, r), shd.batch_sharding(m, 2, r)
        cache = KVCache(k=shd.logical_sharding(CACHE_AXES, m, r), v=shd.logical_sharding(CACHE_AXES, m, r),
                        pos=rows2)
        scalar = shd.replicated(m)
        self._state = SamplingState(cache=cache, tokens=rows2, logprobs=rows2, num_generated=row, done=row,
                                    position=row, keys=row, step=scalar, limit=scalar)
        self._row, self._rows2, self._cache = row, rows2, cache

        self.prefill = jax.jit(self._prefill, static_argnums=(3,),
                               in_shardings=(self._params, rows2, row),
                               out_shardings=(cache, rows2))
        self.start = jax.jit(self._start, static_argnums=(6, 7, 8),
                             in_shardings=(cache, rows2, row, row, scalar, scalar),
                             out_shardings=self._state)
        # The state is donated: its KV cache is the largest buffer in the
        # program, and donation lets XLA update it in place across calls
        # instead of holding an input and an output copy at once.
        self.decode = jax.jit(self._decode, static_argnums=(2, 3), donate_argnums=(1,),
                              in_shardings=(self._params, self._state), out_shardings=self._state)
        self.expand = jax.jit(self._expand, static_argnums=(3,), in_shardings=(cache, rows2, row),
                              out_shardings=(cache, rows2, row))

    # ----- the compiled programs -----

    def _prefill(self, params, prompts: jax.Array, lengths: jax.Array, cache_len: int):
        """prompts [B, P] right-padded, lengths [B] -> (cache with P filled slots, last logits [B, V])."""
        b, p = prompts.shape
        with shd.activation_rules(self.mesh, self.rules):
            idx = jnp.arange(p)[None, :]
            positions = jnp.where(idx < lengths[:, None], idx, -1).astype(jnp.int32)
            out = apply(self.config, params, prompts, positions, want_values=False, return_kv=True,
                        logit_index=jnp.maximum(lengths - 1, 0))
            # The prompt's own keys become slots [0, P) of a cache with room
            # for the continuation; empty slots carry position -1.
            grow = lambda x, axis, fill: jnp.pad(x, [(0, cache_len - p if a == axis else 0) for a in range(x.ndim)],
                                                 constant_values=fill)
            kv = out.cache
            cache = KVCache(k=grow(kv.k, 3, 0), v=grow(kv.v, 3, 0), pos=grow(kv.pos, 1, -1))
        return cache, out.logits[:, 0]

    def _expand(self, cache: KVCache, logits: jax.Array, lengths: jax.Array, k: int):
        """Repeats each row K times (row n -> rows n*K .. n*K+K-1) after a single prefill."""
        rep = lambda x, axis: jnp.repeat(x, k, axis=axis)
        with shd.activation_rules(self.mesh, self.rules):
            cache = KVCache(k=rep(cache.k, 1), v=rep(cache.v, 1), pos=rep(cache.pos, 0))
        return cache, rep(logits, 0), rep(lengths, 0)

    def _start(self, cache: KVCache, logits: jax.Array, lengths: jax.Array, row_ids: jax.Array,
               seed: jax.Array, limit: jax.Array, max_new: int, strategy: SamplingStrategy,
               stop: StopCondition) -> SamplingState:
        b = logits.shape[0]
        keys = _row_keys(seed, row_ids)
        tok, lp = select(self._limit(logits), jax.vmap(jax.random.fold_in, (0, None))(keys, 0), strategy)
        tokens = jnp.full((b, max_new), self.pad_id, jnp.int32).at[:, 0].set(tok)
        logprobs = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(lp)
        return SamplingState(cache=cache, tokens=tokens, logprobs=logprobs,
                             num_generated=jnp.ones((b,), jnp.int32), done=stop.is_stop(tok) | (limit <= 1),
                             position=lengths.astype(jnp.int32), keys=keys, step=jnp.ones((), jnp.int32),
                             limit=jnp.asarray(limit, jnp.int32))

    def _decode(self, params, state: SamplingState, strategy: SamplingStrategy,
                stop: StopCondition) -> SamplingState:
        prompt_len = state.cache.length - state.tokens.shape[1]

        def cond(s: SamplingState):
            return (s.step < s.limit) & ~jnp.all(s.done)

        def body(s: SamplingState) -> SamplingState:
            last = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=True)
            with shd.activation_rules(self.mesh, self.rules):
                out = apply(self.config, params, last, s.position[:, None], cache=s.cache,
                            cache_index=prompt_len + s.step - 1, want_values=False)
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
            tok, lp = select(self._limit(out.logits[:, 0]), step_keys, strategy)
            tok = jnp.where(s.done, self.pad_id, tok)
            lp = jnp.where(s.done, 0.0, lp)
            return s.replace(
                cache=out.cache,
                tokens=jax.lax.dynamic_update_index_in_dim(s.tokens, tok, s.step, axis=1),
                logprobs=jax.lax.dynamic_update_index_in_dim(s.logprobs, lp, s.step, axis=1),
                num_generated=s.num_generated + (~s.done).astype(jnp.int32),
                done=s.done | stop.is_stop(tok) | (s.step + 1 >= s.limit),
                position=s.position + 1,
                step=s.step + 1,
            )

        return jax.lax.while_loop(cond, body, state)

    def _limit(self, logits: jax.Array) -> jax.Array:
        if self.vocab_limit is None:
            return logits
        return jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)

    # ----- host-side entry points -----

    def put_rows(self, x) -> jax.Array:
        """Places a host array [B, ...] on the mesh with its batch dimension sharded."""
        x = jnp.asarray(x)
        return jax.device_put(x, self._rows2 if x.ndim == 2 else self._row)

    def sample(self, params, prompts, lengths, *, max_new: int, strategy: SamplingStrategy,
               stop: StopCondition, seed: int = 0, row_ids=None, limit: int | None = None) -> SamplingState:
        """Samples continuations of right-padded `prompts` [B, P] with true `lengths` [B].

        B must be a multiple of the mesh's batch-parallel size (pad with dummy rows).
        `row_ids` [B] name each row's random stream (default 0..B-1).
        """
        prompts, lengths = self.put_rows(prompts), self.put_rows(lengths)
        b, p = prompts.shape
        row_ids = self.put_rows(jnp.arange(b) if row_ids is None else row_ids)
        cache, logits = self.prefill(params, prompts, lengths, p + max_new)
        return self._run(params, cache, logits, lengths, row_ids, seed, max_new, strategy, stop, limit)

    def rollouts(self, params, prefixes, lengths, *, k: int, max_new: int, strategy: SamplingStrategy,
                 stop: StopCondition, seed: int = 0, share_prefix: bool = True,
                 limit: int | None = None) -> SamplingState:
        """N prefixes [N, P] -> N*K continuations; row n*K+j is rollout j of prefix n.

        share_prefix=True prefills each prefix once and repeats its KV cache K
        times; False prefills N*K copies (the naive baseline). Both use the same
        per-row keys, so they produce the same tokens.
        """
        prefixes, lengths = jnp.asarray(prefixes), jnp.asarray(lengths)
        n, p = prefixes.shape
        row_ids = self.put_rows(jnp.arange(n * k))
        if share_prefix:
            cache, logits = self.prefill(params, self.put_rows(prefixes), self.put_rows(lengths), p + max_new)
            cache, logits, lengths = self.expand(cache, logits, self.put_rows(lengths), k)
        else:
            prefixes, lengths = self.put_rows(jnp.repeat(prefixes, k, 0)), self.put_rows(jnp.repeat(lengths, k))
            cache, logits = self.prefill(params, prefixes, lengths, p + max_new)
        return self._run(params, cache, logits, lengths, row_ids, seed, max_new, strategy, stop, limit)

    def _run(self, params, cache, logits, lengths, row_ids, seed, max_new, strategy, stop, limit):
        limit = max_new if limit is None else min(limit, max_new)
        seed = jnp.asarray(int(seed) % 2**32, jnp.uint32)  # any Python int names a stream
        state = self.start(cache, logits, lengths, row_ids, seed, jnp.asarray(limit, jnp.int32),
                           max_new, strategy, stop)
        return self.decode(params, state, strategy, stop)


@functools.lru_cache(maxsize=16)
def sampler_for(config: ModelConfig, mesh: Mesh | None = None, pad_id: int = 0,
                vocab_limit: int | None = None) -> Sampler:
    """One Sampler (and so one set of compiled programs) per config, mesh and vocab."""
    return Sampler(config, mesh=mesh, pad_id=pad_id, vocab_limit=vocab_limit)

