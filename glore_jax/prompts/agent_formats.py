"""The verify-and-refine agent's layout (RefineRL), registered in the one format registry.

One episode is one sequence; turns are separated by the tool's observation:

    <bos> question <SOL> attempt_1 <eos> report_1 [FIX] attempt_2 <eos> ... report_{T-1} [FIX] attempt_T <eos>

The attempts are sampled and carry loss (their EOS too, when sampled); each
observation (the tool's report and the [FIX] that opens the next turn) is
written by the environment and never does. A refinement turn of the
program task starts with a `# check:` line that ties each phrase of the
question to the code that means it, then the whole program again (changed
or not): the skeptical turn states why the program is right beyond the
examples, or changes it. The final program is the last turn's.

Format `agent` renders a two-turn SFT trace from a task record: the first
attempt is the reference (loss on) or, for half the records (seeded by the
record's id), a plausible bug (`tasks.programs.mutate` / `synthetic.inject_error`;
no loss, a policy must not learn to write it); the tool's report on it; then
the reference again as the refinement (loss on). Bugs that pass the public
checks are kept, so the trace teaches a turn that fixes a passing program.
A labelled refinement pair (`draft`, `target`, `gold`: arithmetic) renders as
its own draft, the calculation checker's report on it, and its target.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from glore_jax.prompts.formats import PromptFormat, policy_prompt, register
from glore_jax.prompts.layout import Example
from glore_jax.tokenizer import Tokenizer

BUG_SHARE = 0.5


def observation(tok: Tokenizer, report: str, max_tokens: int | None = None) -> list[int]:
    """The environment's tokens after an attempt: the report (its end cut to `max_tokens`) and [FIX]."""
    ids = tok.encode(report)
    if max_tokens is not None:
        ids = ids[:max(0, max_tokens - 1)]
    return ids + [tok.control_id("[FIX]")]


def next_prompt(tok: Tokenizer, prompt: Sequence[int], attempt: Sequence[int], report: str,
                max_obs: int | None = None) -> tuple[list[int], int]:
    """(the next turn's prompt, where the observation starts): the attempt closed by EOS (added if it was
    cut at the token limit), then the observation."""
    body = list(attempt)
    if not body or body[-1] != tok.eos_id:
        body.append(tok.eos_id)
    head = list(prompt) + body
    return head + observation(tok, report, max_obs), len(head)


def refinement_text(record: Mapping[str, Any]) -> str:
    """The SFT target of a refinement turn: a labelled record's `target`; else the checklist line and the
    reference program (programs), or the reference solution (arithmetic)."""
    if "target" in record and "draft" in record:
        return record["target"]
    meta = _meta(record)
    if "kind" in meta:
        from glore_jax.tasks import programs
        return programs.checklist(meta) + "\n" + record["answer"]
    return record["answer"]


def _meta(record: Mapping[str, Any]) -> dict:
    return json.loads(record["meta"]) if isinstance(record["meta"], (str, bytes)) else dict(record["meta"])


def first_attempt(record: Mapping[str, Any]) -> tuple[str, str, bool]:
    """(first attempt, the tool's report on it, whether it is the reference) for the SFT trace."""
    from glore_jax.agent.tools import ProgramTool, annotation_report  # late: tools import the executor
    if "draft" in record and "target" in record:   # a labelled refinement pair (arithmetic): its own draft
        from glore_jax.tasks import is_correct
        draft = record["draft"]
        return draft, annotation_report(draft)[0], is_correct(draft, record["gold"])
    meta = _meta(record)
    rng = random.Random(hashlib.sha256(f"agent-trace/{record['id']}".encode()).digest())
    buggy = rng.random() < BUG_SHARE
    if "kind" in meta:
        from glore_jax.tasks import programs
        attempt = programs.mutate(meta, rng) if buggy else None
        if attempt is None:
            return record["answer"], ProgramTool.trace_report(meta, meta), True
        return programs.render_program(attempt), ProgramTool.trace_report(meta, attempt), False
    text = record["answer"]
    if buggy:
        from glore_jax.tasks import ERROR_KINDS, inject_error
        index, kind = rng.randrange(len(meta["steps"])), rng.choice(ERROR_KINDS)
        try:
            text = inject_error(meta, index, kind, rng)
        except ValueError:   # a drop indistinguishable from the next step's: miscompute instead
            text = inject_error(meta, index, "arithmetic", rng)
    return text, annotation_report(text)[0], not buggy


def trace_example(tok: Tokenizer, record: Mapping[str, Any]) -> Example:
    prompt = policy_prompt(tok, record["question"])
    attempt, report, right = first_attempt(record)
    first = tok.encode(attempt) + [tok.eos_id]
    obs = observation(tok, report)
    second = tok.encode(refinement_text(record)) + [tok.eos_id]
    tokens = prompt + first + obs + second
    loss = np.zeros(len(tokens), np.float32)
    if right:
        loss[len(prompt):len(prompt) + len(first)] = 1.0
    loss[len(tokens) - len(second):] = 1.0
    return Example(tokens=np.asarray(tokens, np.int32), loss_mask=loss, step_end_mask=np.zeros(len(tokens), np.float32),
                   step_labels=np.full(len(tokens), -1.0, np.float32), prompt_len=len(prompt))


register(PromptFormat(
    name="agent", fields=("id", "question", "answer|target", "meta|draft"), head="lm",
    loss="a right first attempt and the refinement (EOS included); never a buggy attempt or the report",
    prompt=lambda tok, r: policy_prompt(tok, r["question"]), example=trace_example, task_records=True))
