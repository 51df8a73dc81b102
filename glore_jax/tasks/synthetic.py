"""The embedded synthetic task: seeded multi-step arithmetic word problems.

Each problem follows one running quantity through 3-5 operations
(+, -, *, exact /) on multi-digit numbers, so a small model trained from
scratch still makes real mistakes: carries, a wrong carried value, a dropped
step. Because every intermediate value is known, `first_wrong_step` is an
exact step-level ground truth, which GSM8K cannot give; ORM/SORM step
accuracy is measured against it.

Solutions are rendered in GSM8K form (one `<<expr=value>>` step per line,
then `#### N`), so everything downstream treats the three tasks alike.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

from glore_jax.errors import ConfigError
from glore_jax.tasks.answers import answers_match, extract_answer, format_number, parse_number
from glore_jax.tasks.arithmetic import ExpressionError, evaluate, literals
from glore_jax.tasks.splits import disjoint_split
from glore_jax.tasks.steps import annotations, solution_lines

_OPS = ("+", "-", "*", "/")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Knobs of the generator. Changing any field changes the data set."""

    min_steps: int = 3
    max_steps: int = 5
    min_operand: int = 10       # +/- operands and the start value are multi-digit
    max_operand: int = 999
    max_factor: int = 12        # multipliers and divisors lie in [2, max_factor]
    max_value: int = 99_999     # no intermediate value exceeds this
    operators: tuple[str, ...] = _OPS
    train_size: int = 20_000
    test_size: int = 1_000
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 1 <= self.min_operand < self.max_operand:
            raise ConfigError(f"need 1 <= min_operand < max_operand, got {self.min_operand}, {self.max_operand}")
        if self.max_factor < 2:
            raise ConfigError(f"max_factor must be >= 2, got {self.max_factor}")
        if self.max_value < 2 * self.max_operand:
            raise ConfigError(f"max_value {self.max_value} must be >= 2 * max_operand {self.max_operand}")
        if not self.operators or set(self.operators) - set(_OPS) or "+" not in self.operators:
            # '+' is always possible from any state, so generation never dead-ends.
            raise ConfigError(f"operators must be a subset of {_OPS} containing '+', got {self.operators}")
        if self.train_size < 0 or self.test_size < 0:
            raise ConfigError("split sizes must be non-negative")


_NAMES = (("Mia", "she", "her"), ("Leo", "he", "him"), ("Ava", "she", "her"), ("Noah", "he", "him"),
          ("Zoe", "she", "her"), ("Omar", "he", "him"), ("Ines", "she", "her"), ("Ravi", "he", "him"),
          ("Lena", "she", "her"), ("Tom", "he", "him"), ("Sara", "she", "her"), ("Kai", "he", "him"))
_ITEMS = (("marble", "marbles"), ("sticker", "stickers"), ("coin", "coins"), ("apple", "apples"),
          ("card", "cards"), ("bead", "beads"), ("stamp", "stamps"), ("shell", "shells"),
          ("pencil", "pencils"), ("brick", "bricks"))
_START = ("{Name} has {v} {items}.", "{Name} starts with {v} {items}.",
          "At first, {Name} owns {v} {items}.", "{Name} collected {v} {items} last year.")
# Question sentences per operator; {b} is the operand.
_QUESTION = {
    "+": ("Then {he} buys {b} more {items}.", "{He} finds another {b} {items}.",
          "A friend gives {him} {b} {items}.", "Later {he} wins {b} {items} in a game."),
    "-": ("Then {he} gives away {b} {items}.", "{He} loses {b} {items}.",
          "{He} sells {b} of the {items}.", "Later {he} uses up {b} {items}."),
    "*": ("Then {he} trades each {item} for {b} new {items}.",
          "Next, {he} ends up with {b} times as many {items} as {he} had.",
          "A machine copies the pile so there are {b} times as many {items}."),
    "/": ("Then {he} splits the {items} into {b} equal piles and keeps one pile.",
          "{He} shares the {items} equally among {b} boxes and keeps one box.",
          "Then {he} keeps only one out of every {b} {items}."),
}
_ASK = ("How many {items} does {Name} have now?", "How many {items} does {Name} end up with?",
        "How many {items} are left with {Name} at the end?")
# Solution lines per operator; {a} is the carried value, {r} the result.
_ANSWER = {
    "+": ("After getting {b} more, {he} has {expr} {items}.", "{Name} now has {expr} {items}."),
    "-": ("After losing {b}, {he} has {expr} {items}.", "{Name} now has {expr} {items}."),
    "*": ("With {b} times as many, {he} has {expr} {items}.", "{Name} now has {expr} {items}."),
    "/": ("Keeping one part out of {b}, {he} has {expr} {items}.", "{Name} now has {expr} {items}."),
}


def _fmt(template: str, meta: Mapping[str, Any], **values: Any) -> str:
    he = meta["pronoun"]
    return template.format(Name=meta["name"], he=he, He=he.capitalize(), him=meta["object"],
                           item=meta["item"], items=meta["items"], **values)


def _choose_step(rng: random.Random, a: int, config: SyntheticConfig) -> tuple[str, int] | None:
    options = []
    for op in config.operators:
        if op == "+" and a + config.min_operand <= config.max_value:
            options.append((op, rng.randint(config.min_operand, min(config.max_operand, config.max_value - a))))
        elif op == "-" and a > config.min_operand:
            options.append((op, rng.randint(config.min_operand, min(config.max_operand, a - 1))))
        elif op == "*" and 2 * a <= config.max_value:
            options.append((op, rng.randint(2, min(config.max_factor, config.max_value // a))))
        elif op == "/":
            divisors = [d for d in range(2, config.max_factor + 1) if a % d == 0 and a // d >= 2]
            if divisors:
                options.append((op, rng.choice(divisors)))
    return rng.choice(options) if options else None


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def sample_problem(rng: random.Random, config: SyntheticConfig) -> dict[str, Any]:
    """One problem's `meta`: the story, the per-step (op, a, b, value), the answer."""
    name, pronoun, obj = rng.choice(_NAMES)
    item, items = rng.choice(_ITEMS)
    value = rng.randint(config.min_operand, config.max_operand)
    meta: dict[str, Any] = {"name": name, "pronoun": pronoun, "object": obj, "item": item, "items": items,
                            "start": value, "start_t": rng.randrange(len(_START)),
                            "ask_t": rng.randrange(len(_ASK)), "steps": []}
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        op, b = _choose_step(rng, value, config)  # never None: '+' fits since value <= max_value - ...
        result = int(_apply(op, Fraction(value), Fraction(b)))
        meta["steps"].append({"op": op, "a": value, "b": b, "value": result,
                              "q_t": rng.randrange(len(_QUESTION[op])), "s_t": rng.randrange(len(_ANSWER[op]))})
        value = result
    meta["answer"] = str(value)
    return meta


def render_question(meta: Mapping[str, Any]) -> str:
    sentences = [_fmt(_START[meta["start_t"]], meta, v=meta["start"])]
    sentences += [_fmt(_QUESTION[s["op"]][s["q_t"]], meta, b=s["b"]) for s in meta["steps"]]
    sentences.append(_fmt(_ASK[meta["ask_t"]], meta))
    return " ".join(sentences)


def render_step(meta: Mapping[str, Any], index: int, a: Fraction | int, claimed: Fraction | int) -> str:
    """Step `index` written with carried value `a` and claimed result `claimed` (right or not)."""
    step = meta["steps"][index]
    a_text, b_text, r_text = format_number(Fraction(a)), str(step["b"]), format_number(Fraction(claimed))
    expr = f"{a_text} {step['op']} {b_text} = <<{a_text}{step['op']}{b_text}={r_text}>>{r_text}"
    return _fmt(_ANSWER[step["op"]][step["s_t"]], meta, b=step["b"], expr=expr)


def render_solution(meta: Mapping[str, Any]) -> str:
    lines = [render_step(meta, i, s["a"], s["value"]) for i, s in enumerate(meta["steps"])]
    return "\n".join(lines + [f"#### {meta['answer']}"])


ERROR_KINDS = ("arithmetic", "carry", "drop")


def inject_error(meta: Mapping[str, Any], index: int, kind: str, rng: random.Random) -> str:
    """A solution whose first wrong step is `index`; later steps stay self-consistent.

    kind: 'arithmetic' (step `index` miscomputes its result), 'carry' (it
    starts from a wrong carried value, computing correctly from it), or
    'drop' (it is missing). Later steps carry the resulting wrong value with
    correct arithmetic, the way a real model's error propagates. Dropping a
    step whose successor repeats its operation and operand would look like
    dropping the successor, so that case raises ValueError.
    """
    steps = meta["steps"]
    if not 0 <= index < len(steps):
        raise ValueError(f"step index {index} out of range for {len(steps)} steps")
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}; expected one of {ERROR_KINDS}")
    if (kind == "drop" and index + 1 < len(steps)
            and (steps[index]["op"], steps[index]["b"]) == (steps[index + 1]["op"], steps[index + 1]["b"])):
        raise ValueError(f"dropping step {index} is indistinguishable from dropping step {index + 1}")
    delta = rng.choice([-1, 1]) * rng.choice([1, 2, 3, 9, 10, 11, 100])
    lines, carried = [], Fraction(steps[0]["a"])
    for i, step in enumerate(steps):
        if i == index and kind == "drop":
            continue  # `carried` keeps the value from before the dropped step
        a = carried + delta if (i == index and kind == "carry") else carried
        result = _apply(step["op"], a, Fraction(step["b"]))
        if i == index and kind == "arithmetic":
            result += delta
        lines.append(render_step(meta, i, a, result))
        carried = result
    return "\n".join(lines + [f"#### {format_number(carried)}"])


def _step_is_right(step_text: str, expected: Mapping[str, Any]) -> bool:
    found = annotations(step_text)
    if not found:
        return False
    expr, claimed_text = found[-1]
    claimed = parse_number(claimed_text)
    try:
        computed = evaluate(expr)
        used = sorted(literals(expr))
    except ExpressionError:
        return False
    return (claimed is not None and computed == claimed and claimed == expected["value"]
            and used == sorted([Fraction(expected["a"]), Fraction(expected["b"])]))


def first_wrong_step(record_or_meta: Mapping[str, Any], solution: str) -> int | None:
    """Index of the first wrong step of `solution`, or None if it is entirely right.

    Indices refer to `split_steps(solution)`. A step is wrong if its
    annotation is missing or malformed, its expression does not evaluate to
    its claimed value, its operands are not the true carried value and the
    problem's operand, or its value differs from the true intermediate value.
    A missing required step is wrong at the index where it should be; an extra
    step past the last required one is wrong at its index; and a wrong or
    missing final answer after all-correct steps returns `len(steps)`, the
    index of the final-answer line.
    """
    meta = record_or_meta
    if "steps" not in meta:
        if "meta" not in meta:
            raise ValueError("first_wrong_step needs a synthetic record (with 'meta') or its meta dict")
        meta = json.loads(meta["meta"]) if isinstance(meta["meta"], (str, bytes)) else meta["meta"]
    lines = solution_lines(solution)
    expected = meta["steps"]
    for i, step in enumerate(expected):
        if i >= len(lines.steps) or not _step_is_right(lines.steps[i], step):
            return i
    if len(lines.steps) > len(expected):
        return len(expected)
    if lines.final is None or not answers_match(extract_answer(lines.final), meta["answer"]):
        return len(lines.steps)
    return None


def _structure(meta: Mapping[str, Any]) -> tuple:
    # Two problems with the same start and operations are the same exercise
    # whatever the wording, so test/train disjointness is checked on this.
    return (meta["start"],) + tuple((s["op"], s["b"]) for s in meta["steps"])


def generate_split(config: SyntheticConfig, split: str) -> Iterator[dict[str, str]]:
    """Records of one split ('train' or 'test'), deterministic in `config`; no test problem is in train
    (`tasks.splits.disjoint_split`, keyed on the problem's structure)."""
    def record(meta, part, index):
        return {"id": f"synthetic-{part}-{index:06d}", "question": render_question(meta),
                "answer": render_solution(meta), "gold": meta["answer"], "meta": json.dumps(meta, sort_keys=True)}
    return disjoint_split("synthetic", config.seed, {"train": config.train_size, "test": config.test_size}, split,
                          lambda rng: sample_problem(rng, config), _structure, record)
