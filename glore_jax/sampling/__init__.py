"""Batched sampling over the shared backbone: `generate` for lists of token ids, `Sampler` for arrays.

`generate` pads the batch, the prompt length and the new-token budget up to
power-of-two buckets, so calls of similar sizes reuse one compiled program.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from glore_jax.models import ModelConfig
from glore_jax.sampling.sampler import Sampler, SamplingState, StopCondition, phase_widths, sampler_for
from glore_jax.sampling.strategy import SamplingStrategy, filter_logits, first_argmax, select

__all__ = ["generate", "pad_prompts", "bucket", "stop_ids_for_strings", "Sampler", "SamplingState", "SamplingStrategy", "StopCondition",
           "filter_logits", "first_argmax", "phase_widths", "select", "sampler_for", "unpad"]


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, *, rows: int, length: int,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists into ([rows, length] int32, lengths [rows]); extra rows are 1-token dummies."""
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    tokens = np.full((rows, length), pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"Prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if len(p) > length:
            raise ValueError(f"Prompt {i} has {len(p)} tokens, more than the bucket length {length}")
        arr = np.asarray(p, np.int64)
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"Prompt {i} has token ids outside [0, {vocab_size})")
        tokens[i, :len(p)] = arr
        lengths[i] = len(p)
    return tokens, lengths


def stop_ids_for_strings(tokenizer, strings: Sequence[str]) -> tuple[int, ...]:
    """Ids of every vocab piece whose text contains one of `strings` (e.g. "\n" ends a step line).

    The decode loop compares ids, not text, so a stop string becomes the set
    of pieces that can emit it. Strings that only ever arise across two
    pieces are not caught in the loop; cut those from the decoded text.
    """
    if not strings or any(not s for s in strings):
        raise ValueError(f"stop strings must be non-empty, got {strings!r}")
    ids = []
    for i in range(tokenizer.sp_vocab_size):
        text = tokenizer.decode([i])
        if any(s in text for s in strings):
            ids.append(i)
    return tuple(ids)


def unpad(state: SamplingState, rows: int) -> list[list[int]]:
    """The first `rows` rows' new tokens, each ending at (and including) its stop token."""
    tokens, counts = np.asarray(state.tokens), np.asarray(state.num_generated)
    return [tokens[i, :counts[i]].tolist() for i in range(rows)]


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None, seed: int = 0, *,
             top_k: int | None = None, stop_ids: Sequence[int] = (), mesh: Mesh | None = None,
             pad_id: int = 0) -> list[list[int]]:
    """New tokens for each prompt, ending at and including EOS (or a stop id) if one was produced."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampler = sampler_for(config, mesh, pad_id)
    m = sampler.batch_multiple
    rows = -(-bucket(len(prompts), 1) // m) * m
    length = bucket(max(len(p) for p in prompts))
    tokens, lengths = pad_prompts(prompts, config.vocab_size, rows=rows, length=length, pad_id=pad_id)
    state = sampler.sample(params, tokens, lengths, max_new=bucket(max_new_tokens), limit=max_new_tokens,
                           strategy=SamplingStrategy(temperature=temperature, top_k=top_k, top_p=top_p),
                           stop=StopCondition(eos_id=eos_id, stop_ids=tuple(stop_ids)), seed=seed)
    return unpad(state, len(prompts))
