"""Text in, text out over the jitted sampler, in fixed-shape chunks.

Every call is cut into chunks of `rows` sequences with prompts padded to
`max_prompt_len`, so a whole pipeline stage (thousands of questions) runs on
one compiled program per (rows, length, strategy). Over-long prompts are cut
by `prompts.fit_prompt` and counted in `truncated`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from glore_jax.models import ModelConfig
from glore_jax.prompts import fit_prompt
from glore_jax.sampling import Sampler, SamplingStrategy, StopCondition
from glore_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class TextGenerator:
    config: ModelConfig
    params: object
    tokenizer: Tokenizer
    sampler: Sampler
    max_prompt_len: int
    max_new: int
    rows: int = 32                      # sequences per compiled call
    progress: Callable[[int, int], None] | None = None
    truncated: int = 0

    def __post_init__(self):
        m = self.sampler.batch_multiple
        self.rows = max(m, -(-self.rows // m) * m)

    def _pad(self, prompts: Sequence[Sequence[int]], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full((n_rows, self.max_prompt_len), self.tokenizer.pad_id, np.int32)
        lengths = np.ones((n_rows,), np.int32)
        tokens[:, 0] = self.tokenizer.bos_id
        for i, p in enumerate(prompts):
            ids, cut = fit_prompt(p, self.max_prompt_len)
            self.truncated += cut
            tokens[i, :len(ids)] = ids
            lengths[i] = len(ids)
        return tokens, lengths

    def _decode(self, tokens: np.ndarray, counts: np.ndarray) -> list[str]:
        eos = self.tokenizer.eos_id
        out = []
        for row, n in zip(tokens, counts):
            ids = row[:n].tolist()
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            out.append(self.tokenizer.decode(ids))
        return out

    def complete(self, prompts: Sequence[Sequence[int]], *, k: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
        """K continuations of each prompt (prefix-shared when K > 1), EOS removed."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        per_call = max(1, self.rows // k)
        strategy = SamplingStrategy(temperature=temperature, top_p=top_p)
        stop = StopCondition(eos_id=self.tokenizer.eos_id)
        results: list[list[str]] = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            # Seeds differ per chunk so every (prompt, rollout) gets its own stream.
            call_seed = seed * 1_000_003 + start
            if k == 1:
                toks, lens = self._pad(chunk, self.rows)
                state = self.sampler.sample(self.params, toks, lens, max_new=self.max_new, strategy=strategy,
                                            stop=stop, seed=call_seed)
            else:
                n_prefix = -(-self.rows // k)
                m = self.sampler.batch_multiple
                while (n_prefix * k) % m:
                    n_prefix += 1
                toks, lens = self._pad(chunk, n_prefix)
                state = self.sampler.rollouts(self.params, toks, lens, k=k, max_new=self.max_new,
                                              strategy=strategy, stop=stop, seed=call_seed)
            texts = self._decode(np.asarray(state.tokens), np.asarray(state.num_generated))
            results.extend(texts[i * k:(i + 1) * k] for i in range(len(chunk)))
            if self.progress:
                self.progress(min(start + per_call, len(prompts)), len(prompts))
        return results
