"""What every prompt format is made of: the `Example` layout, its masks, and the truncation rule.

The formats themselves (which tokens form the prompt and which the target)
are entries of the registry in `glore_jax.prompts.formats`.

Masks are aligned with `tokens`: `loss_mask[t] = 1` means token t is a target
(predicted from position t-1), so a trainer uses logits[:, :-1] against
tokens[:, 1:] with loss_mask[:, 1:]. `step_end_mask[t] = 1` marks the last
token of a reasoning step or of the final-answer line; the value head is
read and trained there, with `step_labels[t]` its target (-1 elsewhere).

Truncation rule (`fit`): an example longer than `max_len` loses tokens from
the left of its prompt, right after <bos> (so the start of the question
goes first and the separator before the target always stays). Only if the
target alone does not fit is the target cut, from its end, never its start.
Both cases are reported so pipelines can count them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from glore_jax.errors import ConfigError, DataError
from glore_jax.tasks.steps import join_solution, solution_lines
from glore_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
    """One formatted, unpadded sequence. All arrays are [N]; tokens[:prompt_len] is the prompt."""

    tokens: np.ndarray         # int32 [N]
    loss_mask: np.ndarray      # float32 [N]
    step_end_mask: np.ndarray  # float32 [N]
    step_labels: np.ndarray    # float32 [N], -1 where not a labelled step end
    prompt_len: int

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitResult:
    example: Example
    prompt_truncated: bool
    target_truncated: bool


def solution_tokens(tok: Tokenizer, solution: str) -> tuple[list[int], list[int]]:
    """Ids of a solution and the index of the last token of each step and of the final line."""
    ids, spans = tok.encode_with_offsets(solution)
    ends = []
    for _, line_end in solution_lines(solution).spans:
        # The last token starting before the line's end covers its last character.
        last = max((k for k, (begin, end) in enumerate(spans) if begin < line_end and end > begin),
                   default=None)
        if last is not None and (not ends or last > ends[-1]):
            ends.append(last)
    return ids, ends


def make_example(prompt: list[int], target: list[int], *, step_ends: Sequence[int] = (),
             labels: Sequence[float] | None = None, loss: bool = True) -> Example:
    n = len(prompt) + len(target)
    tokens = np.asarray(prompt + target, dtype=np.int32)
    loss_mask = np.zeros(n, np.float32)
    if loss:
        loss_mask[len(prompt):] = 1.0
    step_end_mask = np.zeros(n, np.float32)
    step_labels = np.full(n, -1.0, np.float32)
    positions = np.asarray(step_ends, dtype=np.int64) + len(prompt)
    step_end_mask[positions] = 1.0
    if labels is not None:
        if len(labels) != len(positions):
            raise DataError(f"got {len(labels)} step labels for {len(positions)} scorable positions "
                             f"(steps plus the final-answer line)")
        step_labels[positions] = np.asarray(labels, np.float32)
    return Example(tokens=tokens, loss_mask=loss_mask, step_end_mask=step_end_mask,
                   step_labels=step_labels, prompt_len=len(prompt))


# ---- shared pieces of the formats ---------------------------------------------------------------

def num_scorable_positions(solution: str) -> int:
    """How many step labels a value format expects: steps, plus 1 if there is a final-answer line."""
    lines = solution_lines(solution)
    return len(lines.steps) + (lines.final is not None)


def mark_bad_step(tok: Tokenizer, draft: str, bad_step: int) -> list[int]:
    """Ids of `draft` with the `[BAD]` control token inserted before line `bad_step`.

    `bad_step` indexes `split_steps(draft)`; `len(steps)` marks the final
    answer line. The marker is an id, not text, so it cannot be forged.
    """
    lines = solution_lines(draft)
    if not 0 <= bad_step < len(lines.spans):
        raise DataError(f"bad_step {bad_step} out of range: the draft has {len(lines.steps)} steps"
                         f"{' and a final line' if lines.final is not None else ''}")
    line_start = lines.spans[bad_step][0]
    ids, spans = tok.encode_with_offsets(draft)
    # Insert before the first token that reaches into the marked line.
    cut = next((k for k, (_, end) in enumerate(spans) if end > line_start), len(ids))
    return ids[:cut] + [tok.bad_id] + ids[cut:]


def local_continuation(solution: str, bad_step: int) -> str:
    """The target of a local refiner: `solution` from step `bad_step` onward."""
    lines = solution_lines(solution)
    return join_solution(lines.steps[bad_step:], lines.final)


def splice_local(draft: str, bad_step: int, continuation: str) -> str:
    """The full refined solution: the draft's steps before `bad_step`, then the continuation."""
    kept = solution_lines(draft).steps[:bad_step]
    return "\n".join(list(kept) + ([continuation.strip("\n")] if continuation.strip() else []))


# ---- fitting to a length -------------------------------------------------------------------------

def fit(example: Example, max_len: int) -> FitResult:
    """Applies the module's truncation rule so that len(example) <= max_len."""
    n, p = len(example), example.prompt_len
    if n <= max_len:
        return FitResult(example=example, prompt_truncated=False, target_truncated=False)
    min_prompt = min(p, 2)  # <bos> and the separator right before the target
    if max_len < min_prompt + 1:
        raise ConfigError(f"max_len {max_len} cannot hold even <bos>, a separator and one target token")
    target_len = n - p
    keep_target = min(target_len, max_len - min_prompt)
    keep_prompt_tail = max_len - keep_target - 1  # prompt tokens kept after <bos>
    index = np.concatenate([np.arange(1), np.arange(p - keep_prompt_tail, p), np.arange(p, p + keep_target)])
    cut = Example(tokens=example.tokens[index], loss_mask=example.loss_mask[index],
                  step_end_mask=example.step_end_mask[index], step_labels=example.step_labels[index],
                  prompt_len=1 + keep_prompt_tail)
    return FitResult(example=cut, prompt_truncated=keep_prompt_tail < p - 1,
                     target_truncated=keep_target < target_len)


def fit_prompt(ids: Sequence[int], max_len: int) -> tuple[list[int], bool]:
    """Inference-side rule: drop from the left after <bos>; returns (ids, truncated)."""
    ids = list(ids)
    if len(ids) <= max_len:
        return ids, False
    if max_len < 2:
        raise ConfigError(f"max_len {max_len} cannot hold <bos> and a separator")
    return ids[:1] + ids[len(ids) - (max_len - 1):], True
