"""Evaluation hooks the training loop calls every `train.eval_every` steps and at the end.

An evaluator is any callable `(params, frozen) -> {name: float}`; `train()`
takes factories `run -> evaluator`, so an evaluator is built from the job's
own model config, tokenizer and mesh. Two come with the loop:
  LossEval        the objective's metrics on fixed held-out batches (`eval_loss`, ...);
  GenerationEval  greedy generation on held-out records, graded against their
                  gold answer (`eval_accuracy`): what RL objectives are judged by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from glore_jax import objectives, prompts
from glore_jax.sampling import Generator
from glore_jax.tasks import is_correct
from glore_jax.training.experience import device_arrays


class Evaluator(Protocol):
    def __call__(self, params: Any, frozen: dict[str, Any]) -> dict[str, float]: ...


class LossEval:
    """The objective's loss and metrics over a fixed list of batches, as means over all of them."""

    def __init__(self, eval_step, batches: Sequence[dict], prefix: str = "eval_"):
        self.eval_step, self.batches, self.prefix = eval_step, list(batches), prefix

    def __call__(self, params: Any, frozen: dict[str, Any]) -> dict[str, float]:
        total = None
        for batch in self.batches:
            m = self.eval_step(params, frozen, device_arrays(batch))
            total = m if total is None else jax.tree_util.tree_map(jnp.add, total, m)
        return {f"{self.prefix}{k}": float(v) for k, v in objectives.finalize(jax.device_get(total)).items()}


class GenerationEval:
    """Greedy accuracy of a policy on records with a `gold` answer, through the one generation API."""

    def __init__(self, run, records: Sequence[dict], *, prompt_format: str = "policy", max_new: int = 256,
                 rows: int = 32, name: str = "eval_accuracy"):
        if not records:
            raise ValueError("GenerationEval needs at least one record")
        fmt = prompts.get(prompt_format)
        if fmt.head != "lm":
            raise ValueError(f"GenerationEval samples, so its format needs an 'lm' head; {prompt_format!r} "
                             f"trains {fmt.head!r}")
        self.run, self.records, self.name = run, list(records), name
        self.prompts = [fmt.prompt(run.tokenizer, r) for r in self.records]
        self.max_new, self.rows = max_new, rows

    def __call__(self, params: Any, frozen: dict[str, Any]) -> dict[str, float]:
        del frozen
        gen = Generator(self.run.model, params, max_new=self.max_new, mesh=self.run.mesh,
                        pad_id=self.run.tokenizer.pad_id, vocab_limit=self.run.tokenizer.vocab_size,
                        rows=self.rows, max_prompt_len=self.run.exp.data.max_len, tokenizer=self.run.tokenizer)
        texts = [row[0] for row in gen.complete(self.prompts)]
        return {self.name: float(np.mean([is_correct(t, r["gold"]) for t, r in zip(texts, self.records)]))}


def held_out_records(run) -> list[dict] | None:
    """What the RL objectives evaluate on: the first `eval_batches x batch_size` held-out records (None
    without held-out records)."""
    if run.eval_records is None:
        return None
    n = min(len(run.eval_records), run.exp.train.eval_batches * run.exp.train.batch_size)
    return [run.eval_records[i] for i in range(n)]


def held_out_accuracy(run, max_new: int) -> GenerationEval | None:
    """The RL objectives' evaluator: greedy accuracy on `held_out_records`."""
    records = held_out_records(run)
    return None if records is None else GenerationEval(run, records, max_new=max_new)
