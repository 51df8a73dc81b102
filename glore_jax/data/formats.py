"""Record -> `prompts.Example`, one function per prompt format a trainer can consume.

Field conventions are those of `glore_jax.data.store`. The functions are
wrapped in a picklable class so Grain can ship them to worker processes.
"""

from __future__ import annotations

from typing import Any

from glore_jax import prompts
from glore_jax.data.store import FORMAT_FIELDS
from glore_jax.prompts import Example
from glore_jax.tasks import is_correct
from glore_jax.tokenizer import Tokenizer

PROMPT_FORMATS = tuple(FORMAT_FIELDS)


def _solution(record: dict[str, Any]) -> str:
    # Task records (gsm8k/svamp/synthetic) call the reference solution `answer`.
    return record["solution"] if "solution" in record else record["answer"]


def _outcome(record: dict[str, Any]) -> bool:
    if "correct" in record:
        return bool(record["correct"])
    return is_correct(_solution(record), record["gold"])


def _policy(tok: Tokenizer, record: dict[str, Any]) -> Example:
    return prompts.policy_example(tok, record["question"], _solution(record))


def _orm(tok: Tokenizer, record: dict[str, Any]) -> Example:
    # ORM: every step carries the final outcome, so the head learns to predict
    # from any prefix whether this solution will end up right.
    solution = _solution(record)
    n = prompts.num_scorable_positions(solution)
    return prompts.value_example(tok, record["question"], solution, [float(_outcome(record))] * n)


def _sorm(tok: Tokenizer, record: dict[str, Any]) -> Example:
    return prompts.value_example(tok, record["question"], _solution(record),
                                 [float(x) for x in record["step_labels"]])


def _global_refiner(tok: Tokenizer, record: dict[str, Any]) -> Example:
    return prompts.global_refiner_example(tok, record["question"], record["draft"], record["target"])


def _local_refiner(tok: Tokenizer, record: dict[str, Any]) -> Example:
    bad_step = int(record["bad_step"])
    continuation = prompts.local_continuation(record["target"], bad_step)
    return prompts.local_refiner_example(tok, record["question"], record["draft"], bad_step, continuation)


_FORMATTERS = {"policy": _policy, "orm": _orm, "sorm": _sorm, "global_refiner": _global_refiner,
               "local_refiner": _local_refiner}
assert set(_FORMATTERS) == set(PROMPT_FORMATS)


class RecordFormatter:
    """`record -> Example` for one prompt format; picklable (the tokenizer pickles its proto)."""

    def __init__(self, prompt_format: str, tokenizer: Tokenizer):
        if prompt_format not in _FORMATTERS:
            raise ValueError(f"unknown prompt format {prompt_format!r}; valid formats: {sorted(_FORMATTERS)}")
        self.prompt_format, self.tokenizer = prompt_format, tokenizer

    def __call__(self, record: dict[str, Any]) -> Example:
        try:
            return _FORMATTERS[self.prompt_format](self.tokenizer, record)
        except KeyError as e:
            raise KeyError(f"prompt format {self.prompt_format!r} needs field {e.args[0]!r}; the record has "
                           f"{sorted(record)}") from None
