"""Verifiable rewards: plain callables `(prompt record, completion text) -> float`, from the task graders.

A user-defined reward is any such callable; the built-in ones are chosen by
`rl.reward`. The grader never raises (`tasks.is_correct`), so a reward
cannot stop a run on strange model output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from glore_jax.tasks import extract_answer, is_correct

RewardFn = Callable[[Mapping[str, Any], str], float]
FORMAT_BONUS = 0.1


def exact_answer(record: Mapping[str, Any], text: str) -> float:
    """1.0 if the completion's final answer equals the record's gold answer, else 0.0."""
    return float(is_correct(text, record["gold"]))


def exact_and_format(record: Mapping[str, Any], text: str) -> float:
    """`exact_answer` plus 0.1 for ending in a parseable final-answer line (shaping for weak policies)."""
    return exact_answer(record, text) + FORMAT_BONUS * float(extract_answer(text) is not None)


REWARDS: dict[str, RewardFn] = {"exact": exact_answer, "exact+format": exact_and_format}
