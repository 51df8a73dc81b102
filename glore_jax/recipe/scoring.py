"""Value-model scores at each step end: how the ORM and SORM read a solution.

A solution is scored at its scorable positions (the last token of each step
and of the final-answer line, see `prompts.value_example`), in fixed-shape
jitted batches. sigmoid(value) is P(the answer will be correct | prefix).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glore_jax.data.batching import collate
from glore_jax.models import ModelConfig, apply
from glore_jax.prompts import value_example
from glore_jax.tokenizer import Tokenizer


@functools.partial(jax.jit, static_argnums=0)
def _probs(config: ModelConfig, params, tokens, positions, segment_ids):
    values = apply(config, params, tokens, positions, segment_ids, want_logits=False).values
    return jax.nn.sigmoid(values)


@dataclasses.dataclass
class ValueScorer:
    config: ModelConfig
    params: object
    tokenizer: Tokenizer
    max_len: int
    rows: int = 32
    truncated: int = 0

    def step_probs(self, items: Sequence[tuple[str, str]]) -> list[np.ndarray]:
        """(question, solution) -> P(correct) at each scorable position (steps, then the final line).

        A truncated example loses positions from the left of its prompt only,
        so its scorable positions survive; if the solution itself was cut,
        the missing positions are absent and counted in `truncated`.
        """
        out: list[np.ndarray] = []
        for start in range(0, len(items), self.rows):
            chunk = items[start:start + self.rows]
            examples = [value_example(self.tokenizer, q, s) for q, s in chunk]
            batch, stats = collate(examples, self.max_len, self.tokenizer.pad_id)
            self.truncated += stats["target_truncated"]
            # Fixed [rows, max_len] shapes: one compiled program for the whole stage.
            batch = {k: np.pad(v, [(0, self.rows - len(chunk)), (0, 0)]) for k, v in batch.items()}
            probs = np.asarray(_probs(self.config, self.params, jnp.asarray(batch["tokens"]),
                                      jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"])))
            mask = batch["step_end_mask"] > 0
            out.extend(probs[i][mask[i]] for i in range(len(chunk)))
        return out

    def final_probs(self, items: Sequence[tuple[str, str]]) -> np.ndarray:
        """P(correct) read at the last scorable position of each solution (0.0 if it has none)."""
        return np.asarray([p[-1] if len(p) else 0.0 for p in self.step_probs(items)])
