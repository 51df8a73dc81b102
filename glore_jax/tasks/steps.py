"""The structure of a solution: reasoning steps, one per line, then a final answer line.

This is the GSM8K layout every task in glore_jax is rendered in:

    Mia buys 27 * 16 = <<27*16=432>>432 marbles.
    Now she has 348 + 432 = <<348+432=780>>780 marbles.
    #### 780

Step i of a solution is its i-th non-empty line before the final answer line.
The value model is read at the end of every step and at the end of the final
line, and the local refiner marks a step index, so every stage must agree on
this split: they all go through `solution_lines`.
"""

from __future__ import annotations

import dataclasses
import re

_HASH_FINAL_RE = re.compile(r"^\s*####")
_ANSWER_IS_FINAL_RE = re.compile(r"^\s*the answer is\b", re.IGNORECASE)
# `<<expr=value>>`; the value may carry a stray unit or `$`, which the
# step checker rejects later rather than here.
ANNOTATION_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolutionLines:
    """A solution split into lines. `spans` are (start, end) character offsets of
    each step and then of the final line, with `end` just past its last
    non-space character, so callers can map lines onto token positions."""

    steps: tuple[str, ...]
    final: str | None
    spans: tuple[tuple[int, int], ...]


def is_final_line(line: str, *, has_hash_line: bool = True) -> bool:
    """`#### N` lines are final; "The answer is N" only in solutions without one
    (a few GSM8K references say "The answer is <<8=8>>8." as a step before `####`)."""
    return bool(_HASH_FINAL_RE.match(line) or (not has_hash_line and _ANSWER_IS_FINAL_RE.match(line)))


def solution_lines(solution: str) -> SolutionLines:
    """Splits a solution into step lines and the final answer line (if any).

    Lines after the final answer line are ignored: the answer has been given.
    """
    steps: list[str] = []
    spans: list[tuple[int, int]] = []
    final = None
    offset = 0
    has_hash_line = any(_HASH_FINAL_RE.match(line) for line in solution.split("\n"))
    for raw in solution.split("\n"):
        stripped = raw.strip()
        start = offset + (len(raw) - len(raw.lstrip()))
        end = offset + len(raw.rstrip())
        offset += len(raw) + 1
        if not stripped:
            continue
        spans.append((start, end))
        if is_final_line(stripped, has_hash_line=has_hash_line):
            final = stripped
            break
        steps.append(stripped)
    return SolutionLines(steps=tuple(steps), final=final, spans=tuple(spans))


def split_steps(solution: str) -> list[str]:
    """The reasoning steps: non-empty lines before the final answer line, stripped."""
    return list(solution_lines(solution).steps)


def join_solution(steps: list[str] | tuple[str, ...], final: str | None) -> str:
    """Inverse of `solution_lines` for clean solutions."""
    return "\n".join(list(steps) + ([final] if final is not None else []))


def annotations(step: str) -> list[tuple[str, str]]:
    """The `(expr, claimed_value)` pairs of `<<expr=value>>` annotations in a step."""
    return [(m.group(1).strip(), m.group(2).strip()) for m in ANNOTATION_RE.finditer(step)]
