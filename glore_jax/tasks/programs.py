"""The program-synthesis task: write a small Python function from its description and examples.

Each problem is a function `f` of one integer `x`, or of a list `xs`:

    scalar  Write f(x). If x is at least 7, return x minus 3. Otherwise, if x is even, return x times 2.
            Otherwise, return x times 3 plus 1.
    list    Write f(xs), where xs is a list of integers. Return the sum of v plus 2 for every v in xs
            that is greater than 4 and odd.                    (or: how many v in xs are ...)

followed by `public_tests` input/output examples. The reference program is
rendered from the problem's structure (`meta`), and every expected output
comes from `evaluate(meta, arg)`, a trusted interpreter of that structure:
nothing is executed to build the data. Hidden tests (`hidden_tests` of
them) decide the reward; they always include each threshold's boundary
(a - 1, a, a + 1), which random public examples often miss, so "at least 7"
written as `x > 7` can pass every public test and still be wrong: the case a
skeptical refinement turn exists for. `mutate` makes such bugs on purpose
(for the agent's SFT traces), and `checklist` is the line a skeptical turn
writes: each phrase of the description next to the code it means.

Records follow the shared schema (`data.records`): `answer` is the
reference program, `meta` the JSON structure with the public and hidden
tests, and `gold` the hidden tests' JSON (what "correct" means here).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from collections.abc import Iterator, Mapping
from typing import Any

from glore_jax.errors import ConfigError
from glore_jax.tasks.splits import disjoint_split


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgramConfig:
    """Knobs of the generator (difficulty and split sizes). Changing any field changes the data set."""

    min_clauses: int = 1        # scalar: if-branches; list: conditions joined by "and" (0 = no filter)
    max_clauses: int = 2
    max_const: int = 12         # thresholds, operands and divisors lie in [1 or 2, max_const]
    max_input: int = 20         # scalar inputs and list elements lie in [0, max_input]
    max_list_len: int = 5
    list_share: float = 0.5     # the share of list problems
    public_tests: int = 3
    hidden_tests: int = 10
    train_size: int = 20_000
    test_size: int = 1_000
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.min_clauses <= self.max_clauses <= 3:
            raise ConfigError(f"need 0 <= min_clauses <= max_clauses <= 3, got {self.min_clauses}, {self.max_clauses}")
        if self.max_const < 3 or self.max_input < self.max_const:
            raise ConfigError(f"need 3 <= max_const <= max_input, got {self.max_const}, {self.max_input}")
        if not 0.0 <= self.list_share <= 1.0 or self.max_list_len < 1:
            raise ConfigError("list_share must lie in [0, 1] and max_list_len be >= 1")
        if self.public_tests < 1 or self.hidden_tests < 1 or self.train_size < 0 or self.test_size < 0:
            raise ConfigError("public_tests and hidden_tests must be >= 1 and split sizes >= 0")


# Conditions on a variable n ('x' or 'v'): (words, code, truth).
_CONDS = {
    "gt": ("greater than {a}", "{n} > {a}", lambda n, a: n > a),
    "ge": ("at least {a}", "{n} >= {a}", lambda n, a: n >= a),
    "lt": ("less than {a}", "{n} < {a}", lambda n, a: n < a),
    "le": ("at most {a}", "{n} <= {a}", lambda n, a: n <= a),
    "even": ("even", "{n} % 2 == 0", lambda n, a: n % 2 == 0),
    "odd": ("odd", "{n} % 2 == 1", lambda n, a: n % 2 == 1),
    "div": ("divisible by {a}", "{n} % {a} == 0", lambda n, a: n % a == 0),
}
# Expressions of n: (words, code, value); `b`, `c` are the operands.
_EXPRS = {
    "add": ("{n} plus {b}", "{n} + {b}", lambda n, b, c: n + b),
    "sub": ("{n} minus {b}", "{n} - {b}", lambda n, b, c: n - b),
    "mul": ("{n} times {b}", "{n} * {b}", lambda n, b, c: n * b),
    "muladd": ("{n} times {b} plus {c}", "{n} * {b} + {c}", lambda n, b, c: n * b + c),
    "mulsub": ("{n} times {b} minus {c}", "{n} * {b} - {c}", lambda n, b, c: n * b - c),
}


def _cond(rng: random.Random, cfg: ProgramConfig) -> dict:
    kind = rng.choice(sorted(_CONDS))
    low = 2 if kind == "div" else 1
    return {"kind": kind, "a": rng.randint(low, min(cfg.max_const, 5) if kind == "div" else cfg.max_const)}


def _expr(rng: random.Random, cfg: ProgramConfig) -> dict:
    return {"kind": rng.choice(sorted(_EXPRS)), "b": rng.randint(2, cfg.max_const), "c": rng.randint(1, cfg.max_const)}


def cond_words(c: Mapping, n: str) -> str:
    return _CONDS[c["kind"]][0].format(n=n, a=c["a"])


def cond_code(c: Mapping, n: str) -> str:
    return _CONDS[c["kind"]][1].format(n=n, a=c["a"])


def expr_words(e: Mapping, n: str) -> str:
    return _EXPRS[e["kind"]][0].format(n=n, b=e["b"], c=e["c"])


def expr_code(e: Mapping, n: str) -> str:
    return _EXPRS[e["kind"]][1].format(n=n, b=e["b"], c=e["c"])


def _holds(c: Mapping, n: int) -> bool:
    return _CONDS[c["kind"]][2](n, c["a"])


def _value(e: Mapping, n: int) -> int:
    return _EXPRS[e["kind"]][2](n, e["b"], e["c"])


def evaluate(meta: Mapping[str, Any], arg: Any) -> int:
    """The trusted output of the problem's function on `arg` (no code is executed)."""
    if meta["kind"] == "scalar":
        for branch in meta["branches"]:
            if _holds(branch["if"], arg):
                return _value(branch["then"], arg)
        return _value(meta["otherwise"], arg)
    chosen = [v for v in arg if all(_holds(c, v) for c in meta["filter"])]
    return len(chosen) if meta["agg"] == "count" else sum(_value(meta["map"], v) for v in chosen)


def render_program(meta: Mapping[str, Any]) -> str:
    """The reference program, in the one style the SFT data teaches."""
    if meta["kind"] == "scalar":
        lines = ["def f(x):"]
        for branch in meta["branches"]:
            lines += [f"    if {cond_code(branch['if'], 'x')}:", f"        return {expr_code(branch['then'], 'x')}"]
        return "\n".join(lines + [f"    return {expr_code(meta['otherwise'], 'x')}"])
    name, step = ("count", "1") if meta["agg"] == "count" else ("total", expr_code(meta["map"], "v"))
    lines = ["def f(xs):", f"    {name} = 0", "    for v in xs:"]
    if meta["filter"]:
        lines += [f"        if {' and '.join(cond_code(c, 'v') for c in meta['filter'])}:", f"            {name} += {step}"]
    else:
        lines.append(f"        {name} += {step}")
    return "\n".join(lines + [f"    return {name}"])


def describe(meta: Mapping[str, Any]) -> str:
    """The problem statement without examples."""
    if meta["kind"] == "scalar":
        parts = ["Write f(x)."]
        for i, branch in enumerate(meta["branches"]):
            lead = "If" if i == 0 else "Otherwise, if"
            parts.append(f"{lead} x is {cond_words(branch['if'], 'x')}, return {expr_words(branch['then'], 'x')}.")
        lead = "Otherwise, return" if meta["branches"] else "Return"
        return " ".join(parts + [f"{lead} {expr_words(meta['otherwise'], 'x')}."])
    conds = " and ".join(cond_words(c, "v") for c in meta["filter"])
    if meta["agg"] == "count":
        task = f"Return how many numbers in xs are {conds}."
    else:
        where = f" that is {conds}" if conds else ""
        task = f"Return the sum of {expr_words(meta['map'], 'v')} for every v in xs{where}."
    return f"Write f(xs), where xs is a list of integers. {task}"


def _show(arg: Any) -> str:
    return json.dumps(arg)


def render_question(meta: Mapping[str, Any]) -> str:
    examples = "; ".join(f"f({_show(a)}) = {out}" for a, out in meta["public"])
    return f"{describe(meta)} Examples: {examples}."


def checklist(meta: Mapping[str, Any]) -> str:
    """A skeptical turn's first line: each condition of the description beside the code that means it.

    Conditions, because that is where examples prove least: "at least 7" and `x > 7` agree on every
    input but 7. Without conditions the line says so."""
    if meta["kind"] == "scalar":
        pairs = [(cond_words(b["if"], "x"), cond_code(b["if"], "x")) for b in meta["branches"]]
    else:
        pairs = [(cond_words(c, "v"), cond_code(c, "v")) for c in meta["filter"]]
    return "# check: " + ("; ".join(f"{w} is {c}" for w, c in pairs) if pairs else "no conditions")


def _inputs(meta: Mapping[str, Any], rng: random.Random, cfg: ProgramConfig, boundaries: bool, n: int) -> list:
    conds = [b["if"] for b in meta["branches"]] if meta["kind"] == "scalar" else meta["filter"]
    edges = sorted({a + d for c in conds if c["kind"] in ("gt", "ge", "lt", "le") for a in [c["a"]]
                    for d in (-1, 0, 1) if 0 <= a + d <= cfg.max_input}) if boundaries else []
    if meta["kind"] == "scalar":   # distinct inputs: a repeated example shows nothing new
        rest = [x for x in range(cfg.max_input + 1) if x not in edges[:n]]
        return edges[:n] + rng.sample(rest, min(len(rest), max(0, n - len(edges))))
    lists = [[rng.randint(0, cfg.max_input) for _ in range(rng.randint(1, cfg.max_list_len))] for _ in range(n)]
    for i, edge in enumerate(edges[:n]):  # put each boundary value into its own hidden list
        lists[i][rng.randrange(len(lists[i]))] = edge
    return lists


def sample_problem(rng: random.Random, cfg: ProgramConfig) -> dict[str, Any]:
    """One problem's `meta`: its structure and its public and hidden tests, (argument, output) pairs."""
    clauses = rng.randint(cfg.min_clauses, cfg.max_clauses)
    if rng.random() < cfg.list_share:
        agg = rng.choice(["sum", "count"])
        meta: dict[str, Any] = {"kind": "list", "agg": agg, "filter": [_cond(rng, cfg) for _ in range(clauses)],
                                "map": _expr(rng, cfg)}
        if agg == "count":
            meta["filter"] = meta["filter"] or [_cond(rng, cfg)]   # counting everything is too easy
    else:
        meta = {"kind": "scalar", "branches": [{"if": _cond(rng, cfg), "then": _expr(rng, cfg)} for _ in range(clauses)],
                "otherwise": _expr(rng, cfg)}
    meta["public"] = [[a, evaluate(meta, a)] for a in _inputs(meta, rng, cfg, False, cfg.public_tests)]
    meta["hidden"] = [[a, evaluate(meta, a)] for a in _inputs(meta, rng, cfg, True, cfg.hidden_tests)]
    return meta


_NEIGHBOUR = {"gt": "ge", "ge": "gt", "lt": "le", "le": "lt", "even": "odd", "odd": "even", "div": "div"}


def mutate(meta: Mapping[str, Any], rng: random.Random, tries: int = 20) -> dict[str, Any] | None:
    """A plausible bug: a boundary flipped (> for >=), a constant off by one or two, an operator swapped,
    or a branch dropped, that changes the output on at least one public or hidden test (None if `tries`
    edits found none). Tests are kept: they still describe the right function."""
    tests = meta["public"] + meta["hidden"]
    for _ in range(tries):
        out = _edit(meta, rng)
        if any(evaluate(out, a) != o for a, o in tests):
            return out
    return None


def _edit(meta: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    out = copy.deepcopy(dict(meta))
    conds = [b["if"] for b in out.get("branches", [])] + out.get("filter", [])
    exprs = [b["then"] for b in out.get("branches", [])] + ([out["otherwise"]] if out["kind"] == "scalar"
                                                            else [out["map"]] if out["agg"] == "sum" else [])
    moves = (["boundary", "threshold"] if conds else []) + (["operand", "operator"] if exprs else [])
    if out["kind"] == "scalar" and out["branches"]:
        moves.append("drop")
    move = rng.choice(moves)
    if move == "boundary":
        c = rng.choice(conds)
        c["kind"] = _NEIGHBOUR[c["kind"]]
    elif move == "threshold":
        c = rng.choice(conds)
        c["a"] = max(2 if c["kind"] == "div" else 1, c["a"] + rng.choice([-2, -1, 1, 2]))
    elif move == "operand":
        e = rng.choice(exprs)
        key = rng.choice(["b", "c"] if e["kind"] in ("muladd", "mulsub") else ["b"])
        e[key] = max(1, e[key] + rng.choice([-2, -1, 1, 2]))
    elif move == "operator":
        e = rng.choice(exprs)
        e["kind"] = {"add": "sub", "sub": "add", "mul": "add", "muladd": "mulsub", "mulsub": "muladd"}[e["kind"]]
    else:
        out["branches"].pop(rng.randrange(len(out["branches"])))
    return out


def _structure(meta: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in meta.items() if k not in ("public", "hidden")}, sort_keys=True)


def generate_split(cfg: ProgramConfig, split: str) -> Iterator[dict[str, str]]:
    """Records of one split ('train' or 'test'), deterministic in `cfg`; no test function is in train
    (`tasks.splits.disjoint_split`, keyed on the function's structure, whatever its tests)."""
    def record(meta, part, index):
        return {"id": f"programs-{part}-{index:06d}", "question": render_question(meta), "answer": render_program(meta),
                "gold": json.dumps(meta["hidden"]), "meta": json.dumps(meta, sort_keys=True)}
    return disjoint_split("programs", cfg.seed, {"train": cfg.train_size, "test": cfg.test_size}, split,
                          lambda rng: sample_problem(rng, cfg), _structure, record)
