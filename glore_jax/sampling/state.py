"""What a decode loop carries (`SamplingState`), when a row stops, and how the suffix cache grows."""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from glore_jax.models.decoding import LayerCache


@flax.struct.dataclass
class SamplingState:
    """Everything the decode loop carries. B rows, N = max new tokens."""

    suffix: LayerCache        # keys/values of the new tokens fed so far (slot i = new token i)
    tokens: jax.Array         # [B, N] int32 new tokens; pad_id after a row stops
    logprobs: jax.Array       # [B, N] float32 log p(token) under the raw model distribution
    num_generated: jax.Array  # [B] int32 tokens produced, the stop token included
    done: jax.Array           # [B] bool
    position: jax.Array       # [B] int32 position of the newest token (not yet in the cache)
    keys: jax.Array           # [B] per-row PRNG keys
    step: jax.Array           # [L] int32 new tokens produced so far by the longest row of each decode loop
                              # (L = 1, or one loop per device in data-parallel decode: `Sampler.loops`)
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


def phase_widths(max_new: int, phases: int) -> list[int]:
    """Suffix sizes of the decode phases: about `phases` equal steps (multiples of 8) up to max_new - 1.

    The last new token is never fed back, so N new tokens need N - 1 suffix slots.
    """
    n = max_new - 1
    if n <= 0:
        return []
    chunk = -(-n // max(1, phases))
    chunk = -(-chunk // 8) * 8
    return sorted({min(n, chunk * i) for i in range(1, -(-n // chunk) + 1)})
