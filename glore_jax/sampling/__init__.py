"""Sampling over the shared backbone. The front door is `Generator` (or its one-call shortcut `generate`);
`Sampler` underneath holds the compiled prefill and decode programs and works on padded arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from glore_jax.models import ModelConfig
from glore_jax.sampling.generator import Completion, Generator, bucket, completions, pad_prompts
from glore_jax.sampling.sampler import Sampler, sampler_for
from glore_jax.sampling.state import SamplingState, StopCondition, phase_widths
from glore_jax.sampling.strategy import SamplingStrategy, filter_logits, first_argmax, select

__all__ = ["Completion", "Generator", "generate", "pad_prompts", "bucket", "completions", "stop_ids_for_strings",
           "Sampler", "SamplingState", "SamplingStrategy", "StopCondition", "filter_logits", "first_argmax",
           "phase_widths", "select", "sampler_for", "unpad"]


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
    """New tokens for each prompt, ending at and including EOS (or a stop id) if one was produced.

    One bucketed `Generator` call; the new-token budget is bucketed too, so
    similar requests reuse one compiled program.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    gen = Generator(config, params, max_new=bucket(max_new_tokens), mesh=mesh, pad_id=pad_id)
    out = gen.generate(prompts, strategy=SamplingStrategy(temperature=temperature, top_k=top_k, top_p=top_p),
                       stop=StopCondition(eos_id=eos_id, stop_ids=tuple(stop_ids)), seed=seed, limit=max_new_tokens)
    return [row[0].tokens for row in out]
