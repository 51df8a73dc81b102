"""The one value-scoring API: P(final answer correct) at each step end, on any mesh.

A solution is scored at its scorable positions (the last token of each step
and of the final-answer line, see `prompts.value_example`), in fixed-shape
batches through `models.make_forward`, so params and rows are sharded by the
rules table like every other compiled function. sigmoid(value) is
P(the answer will be correct | prefix).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from glore_jax import sharding as shd
from glore_jax.data.batching import collate
from glore_jax.models import ModelConfig, make_forward
from glore_jax.prompts import value_example
from glore_jax.tokenizer import Tokenizer


@functools.lru_cache(maxsize=16)
def _forward(config: ModelConfig, mesh: Mesh):
    # One compiled program per (config, mesh), whatever the number of scorers built.
    return make_forward(config, mesh, want_values=True)


@dataclasses.dataclass
class ValueScorer:
    config: ModelConfig
    params: object
    tokenizer: Tokenizer
    max_len: int
    rows: int = 32
    mesh: Mesh | None = None
    truncated: int = 0          # solutions cut at their end (scorable positions lost)
    prompt_truncated: int = 0   # questions cut from the left (positions kept)
    scored: int = 0

    def __post_init__(self):
        if "value" not in self.config.heads:
            raise ValueError(f"ValueScorer needs a 'value' head; config.heads={self.config.heads}")
        self.mesh = self.mesh if self.mesh is not None else shd.single_device_mesh()
        m = int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        self.rows = max(m, -(-self.rows // m) * m)

    def values(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Raw value logits [B, T] of rows whose padding has position -1 (never attended to)."""
        return np.asarray(_forward(self.config, self.mesh)(self.params, tokens, positions))

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
            self.prompt_truncated += stats["prompt_truncated"]
            self.scored += len(chunk)
            # Fixed [rows, max_len] shapes: one compiled program for the whole stage.
            batch = {k: np.pad(v, [(0, self.rows - len(chunk)), (0, 0)]) for k, v in batch.items()}
            positions = np.where(batch["segment_ids"] > 0, batch["positions"], -1).astype(np.int32)
            probs = np.asarray(jax.nn.sigmoid(self.values(batch["tokens"], positions)))
            mask = batch["step_end_mask"] > 0
            out.extend(probs[i][mask[i]] for i in range(len(chunk)))
        return out

    def counts(self) -> dict[str, int]:
        """What was cut to `max_len` so far (the pipeline reports these per stage)."""
        return {"scored": self.scored, "scored_prompt_cut": self.prompt_truncated, "scored_cut": self.truncated}

    def final_probs(self, items: Sequence[tuple[str, str]]) -> np.ndarray:
        """P(correct) read at the last scorable position of each solution (0.0 if it has none)."""
        return np.asarray([p[-1] if len(p) else 0.0 for p in self.step_probs(items)])
