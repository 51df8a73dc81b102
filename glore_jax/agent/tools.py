"""The agent's local tools: check an attempt, say what was found in words, and grade it on hidden truth.

A tool turns (record, attempt text) into a `Check`:
    report      the observation the agent reads before its next turn (tokens masked out of the loss)
    public_ok   every public check passed (the agent cannot tell more than this)
    reward      the hidden grade: 1/0, or the fraction of hidden tests passed (`reward="fraction"`)
    solved      every hidden test passed (pass@1 counts these)

Two tools, chosen by the record's task (`tool_for`), so the agent loop is task-generic:
    ProgramTool     runs the program in the sandboxed executor (`glore_jax.execution`) on the
                    public tests (reported) and the hidden tests (graded), in one child process.
    AnnotationTool  re-computes each `<<expr=value>>` of an arithmetic solution (public) and grades
                    the final answer against gold (hidden). A carried wrong value that is computed
                    correctly passes every check: the arithmetic twin of a boundary bug.

A passing report still asks for a check: the skeptical turn happens anyway
(see `glore_jax.agent.episodes`). `trace_report` renders the same words for
an attempt whose outputs are known without running it, for SFT traces.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from glore_jax.execution import Limits, run_many
from glore_jax.tasks import annotations, evaluate as evaluate_expr, format_number, is_correct, parse_number
from glore_jax.tasks import ExpressionError
from glore_jax.tasks import programs

from glore_jax.agent.config import AGENT_REWARDS as REWARDS
SKEPTIC = "Passing examples is not proof: check every rule of the question."
_MAX_SHOWN = 2   # failures quoted in a report; the rest are counted


@dataclasses.dataclass(frozen=True)
class Check:
    report: str
    public_ok: bool
    reward: float
    solved: bool
    seconds: float = 0.0


def _meta(record: Mapping[str, Any]) -> dict:
    meta = record["meta"]
    return json.loads(meta) if isinstance(meta, (str, bytes)) else dict(meta)


def program_report(public: Sequence[Sequence[Any]], verdicts: Sequence[str], outputs: Sequence[Any]) -> str:
    """The observation for public tests [(arg, expected)] with per-test verdicts and returned values."""
    if verdicts and verdicts[0].startswith("refused:"):
        return f"The program was refused ({verdicts[0].split(':', 1)[1]}): write plain Python."
    passed = sum(v == "pass" for v in verdicts)
    head = f"Public tests: {passed}/{len(verdicts)} passed."
    if passed == len(verdicts):
        return f"{head} {SKEPTIC}"
    shown = []
    for (arg, expected), verdict, got in zip(public, verdicts, outputs):
        if verdict == "pass":
            continue
        call = f"f({json.dumps(arg)})"
        shown.append(f"{call} returned {json.dumps(got)}, expected {expected}." if verdict == "wrong_answer"
                     else f"{call} gave {verdict.replace('error:', 'error ')}, expected {expected}.")
        if len(shown) == _MAX_SHOWN:
            break
    return " ".join([head] + shown)


class ProgramTool:
    """Public and hidden tests of a `programs` record, run in the sandbox (one process per program)."""

    name = "programs"

    def __init__(self, reward: str = "binary", limits: Limits = Limits(wall_seconds=5.0), workers: int = 2):
        self.reward, self.limits, self.workers = reward, limits, workers

    def check(self, records: Sequence[Mapping[str, Any]], texts: Sequence[str]) -> list[Check]:
        metas = [_meta(r) for r in records]
        jobs, index = [], {}
        for meta, text in zip(metas, texts):   # identical (program, problem) pairs run once
            key = (text, json.dumps(meta["public"] + meta["hidden"]))
            if key not in index:
                index[key] = len(jobs)
                jobs.append((text, "f", [([a], out) for a, out in meta["public"] + meta["hidden"]]))
        t0 = time.perf_counter()
        reports = run_many(jobs, self.limits, workers=self.workers)
        share = (time.perf_counter() - t0) / max(len(texts), 1)
        out = []
        for meta, text in zip(metas, texts):
            rep = reports[index[(text, json.dumps(meta["public"] + meta["hidden"]))]]
            n = len(meta["public"])
            public, hidden = rep.verdicts[:n], rep.verdicts[n:]
            outputs = rep.outputs[:n] if rep.outputs else (None,) * n
            passed = sum(v == "pass" for v in hidden) / len(hidden)
            out.append(Check(report=program_report(meta["public"], public, outputs),
                             public_ok=all(v == "pass" for v in public), solved=passed == 1.0,
                             reward=passed if self.reward == "fraction" else float(passed == 1.0), seconds=share))
        return out

    @staticmethod
    def trace_report(meta: Mapping[str, Any], attempt_meta: Mapping[str, Any]) -> str:
        """The report the sandbox gives `render_program(attempt_meta)`, from the trusted interpreter."""
        outputs = [programs.evaluate(attempt_meta, a) for a, _ in meta["public"]]
        verdicts = ["pass" if got == out else "wrong_answer" for got, (_, out) in zip(outputs, meta["public"])]
        return program_report(meta["public"], verdicts, outputs)


def annotation_report(text: str) -> tuple[str, bool]:
    """(observation, all checks passed) for the `<<expr=value>>` steps of an arithmetic solution."""
    steps = annotations(text)
    if not steps:
        return "No calculations found: write each step as <<expression=value>>.", False
    wrong = []
    for i, (expr, claimed) in enumerate(steps, 1):
        value = parse_number(claimed)
        try:
            computed = evaluate_expr(expr)
        except ExpressionError:
            wrong.append(f"Step {i}: {expr} cannot be computed.")
            continue
        if value is None or Fraction(value) != computed:
            wrong.append(f"Step {i}: {expr} is {format_number(computed)}, not {claimed}.")
    if not wrong:
        return f"All {len(steps)} calculations check out. {SKEPTIC}", True
    return f"{len(wrong)} of {len(steps)} calculations are wrong. " + " ".join(wrong[:_MAX_SHOWN]), False


class AnnotationTool:
    """The arithmetic task's tool: calculations re-computed (public), the final answer graded (hidden)."""

    name = "annotations"

    def check(self, records: Sequence[Mapping[str, Any]], texts: Sequence[str]) -> list[Check]:
        out = []
        for record, text in zip(records, texts):
            t0 = time.perf_counter()
            report, ok = annotation_report(text)
            solved = is_correct(text, record["gold"])
            out.append(Check(report=report, public_ok=ok, reward=float(solved), solved=solved,
                             seconds=time.perf_counter() - t0))
        return out


def tool_for(task: str, reward: str = "binary"):
    """The tool of a task: `programs` runs code; the arithmetic tasks re-compute annotations."""
    if reward not in REWARDS:
        from glore_jax.errors import ConfigError
        raise ConfigError(f"agent.reward {reward!r} unknown; valid: {list(REWARDS)}")
    return ProgramTool(reward) if task == "programs" else AnnotationTool()
