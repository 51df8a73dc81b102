"""The registry of prompt formats: every format glore_jax trains on or samples from, one entry each.

An entry says everything a module needs to know about its format: the record
fields it reads, how it renders the prompt (what a sampler is given) and the
training example (prompt + target with masks), which head the target trains
and which tokens carry loss, and when sampling stops. The data pipeline, the
objectives, the sampler front door and the GLoRe stages all read these
entries, so adding a format is one `register(PromptFormat(...))` call below
plus its test.

Layouts (`<x>` are control tokens, see `glore_jax.tokenizer`; left of `|` is
the prompt, right the target):

    policy         <bos> question <SOL> | solution <eos>
    self_correct   <bos> question <SOL> draft <eos> instruction <SOL> | solution <eos>   (SCoRe turn 2;
                   without a draft, turn 1: the policy layout)
    orm, sorm      <bos> question <SOL> | solution <eos>      (value head read at step ends)
    global_refiner <bos> question <DRAFT> draft <FIX> | solution <eos>
    local_refiner  <bos> question <DRAFT> draft[:i] <BAD> draft[i:] <FIX> draft[:i] | continuation <eos>
    latro          <bos> question <SOL> | The answer is {gold}. <eos>   (LaTRO's y; the example is
    latro_hash     <bos> question <SOL> | #### {gold} <eos>             answer-only SFT; LaTRO puts a
                                                                        sampled rationale before the target)

In the local format, `continuation` is the corrected solution from the first
wrong step `i` onward; `layout.splice_local` turns a sampled continuation back
into a full solution. The kept steps `draft[:i]` are replayed after <FIX>
(prompt, no loss) so the refiner continues a solution exactly where the
policy would, with the marked draft as extra context: without them a small
refiner had to find the marker and count steps to know which operation came
next, and it mostly repeated or skipped one (demo: 91% of right drafts broken).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from glore_jax.errors import ConfigError, DataError
from glore_jax.prompts.layout import (Example, local_continuation, make_example, mark_bad_step,
                                      num_scorable_positions, solution_tokens)
from glore_jax.tasks import is_correct
from glore_jax.tasks.steps import solution_lines
from glore_jax.tokenizer import Tokenizer

Record = Mapping[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptFormat:
    """One prompt format. `fields` lists the record fields it reads; "a|b" reads a, or else b."""

    name: str
    fields: tuple[str, ...]
    head: str                                          # 'lm' or 'value': the head its target trains
    loss: str                                          # which target tokens carry loss, in words
    prompt: Callable[[Tokenizer, Record], list[int]]   # the ids a sampler continues
    example: Callable[[Tokenizer, Record], Example]    # prompt + target, with masks, for training
    stop: tuple[str, ...] = ()                         # stop strings besides EOS ('' never stops early)
    task_records: bool = False                         # renders plain task records; else needs labelled ones

    def __post_init__(self):
        if self.head not in ("lm", "value"):
            raise ValueError(f"format {self.name!r}: head must be 'lm' or 'value', got {self.head!r}")

    def missing(self, record: Record) -> list[str]:
        return [f for f in self.fields if not any(a in record for a in f.split("|"))]

    def check(self, source: Sequence[Record], *, name: str = "source") -> None:
        """Fails early, naming the missing fields, rather than deep inside a Grain worker."""
        if len(source) == 0:
            raise DataError(f"{name} is empty")
        missing = self.missing(source[0])
        if missing:
            raise DataError(f"{name} records lack fields {missing} needed by prompt format {self.name!r}; "
                             f"record 0 has {sorted(source[0])}")


# The types of the record fields formats read; a record is checked against
# them where it enters (a records file, or the renderer for in-memory lists),
# so "correct": "false" is an error naming the field instead of a positive.
_TEXT_FIELDS = ("id", "question", "answer", "solution", "draft", "target", "gold", "meta")


def check_record(record: Any) -> str | None:
    """None if the record's known fields have valid types, else what is wrong (naming the field)."""
    if not isinstance(record, Mapping):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in _TEXT_FIELDS:
        if key in record and not isinstance(record[key], str):
            return f"field {key!r} must be a string, got {type(record[key]).__name__} {record[key]!r:.40}"
    if "correct" in record:
        # A bool; a sampling stage's record grades each of its candidates: a list or a dict of bools.
        correct = record["correct"]
        values = correct.values() if isinstance(correct, dict) else correct if isinstance(correct, list) else [correct]
        if not all(isinstance(c, bool) for c in values):
            return f"field 'correct' must be a boolean (true/false), or a list or object of them, got " \
                   f"{type(correct).__name__} {correct!r:.40}"
    if "bad_step" in record and (isinstance(record["bad_step"], bool) or not isinstance(record["bad_step"], int)
                                 or record["bad_step"] < 0):
        return f"field 'bad_step' must be a non-negative integer, got {record['bad_step']!r:.40}"
    if "step_labels" in record:
        labels = record["step_labels"]
        if not isinstance(labels, list):
            return f"field 'step_labels' must be a list of numbers, got {type(labels).__name__}"
        for k, x in enumerate(labels):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0.0 <= x <= 1.0 or x == -1):
                return f"field 'step_labels'[{k}] must be a number in [0, 1] (or -1 = ignored), got {x!r:.40}"
    return None


FORMATS: dict[str, PromptFormat] = {}


def register(fmt: PromptFormat) -> PromptFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"prompt format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get(name: str) -> PromptFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown prompt format {name!r}; valid formats: {sorted(FORMATS)}")
    return FORMATS[name]


class Renderer:
    """`record -> Example` for one format; picklable, so Grain can ship it to worker processes."""

    def __init__(self, name: str, tokenizer: Tokenizer):
        get(name)  # fail here, naming the valid formats
        # The name, not the entry: entries hold lambdas, which do not pickle.
        self.name, self.tokenizer = name, tokenizer

    def __call__(self, record: Record) -> Example:
        fmt = get(self.name)
        bad = check_record(record)
        if bad is not None:
            raise DataError(f"record {record.get('id', '?') if isinstance(record, Mapping) else '?'}: {bad}")
        missing = fmt.missing(record)
        if missing:
            raise DataError(f"prompt format {self.name!r} needs fields {missing}; the record has {sorted(record)}")
        try:
            return fmt.example(self.tokenizer, record)
        except DataError as e:
            raise DataError(f"record {record.get('id', '?')} in format {self.name!r}: {e}") from None


def _solution(record: Record) -> str:
    # Task records (gsm8k/svamp/synthetic) call the reference solution `answer`.
    return record["solution"] if "solution" in record else record["answer"]


# ---- policy: question -> solution ----------------------------------------------------------------

def policy_prompt(tok: Tokenizer, question: str) -> list[int]:
    """[P] ids the policy samples a solution after."""
    return [tok.bos_id] + tok.encode(question) + [tok.control_id("[SOL]")]


def policy_example(tok: Tokenizer, question: str, solution: str) -> Example:
    """SFT example: loss on the solution tokens and EOS only."""
    return make_example(policy_prompt(tok, question), tok.encode(solution) + [tok.eos_id])


register(PromptFormat(
    name="policy", fields=("question", "solution|answer"), head="lm", loss="the solution and EOS",
    prompt=lambda tok, r: policy_prompt(tok, r["question"]),
    example=lambda tok, r: policy_example(tok, r["question"], _solution(r)), task_records=True))


# ---- value models: a solution, read at each step end ---------------------------------------------

def value_example(tok: Tokenizer, question: str, solution: str,
                  labels: Sequence[float] | None = None) -> Example:
    """Question + solution with `step_end_mask` at each step's and the final line's last token.

    `labels` (one per scorable position, in order; e.g. ORM: the outcome
    repeated, SORM: per-step rollout estimates) fill `step_labels`; leave it
    None to score. `loss_mask` marks the solution tokens in case a trainer
    adds an auxiliary LM loss; value losses use `step_end_mask`.
    """
    ids, ends = solution_tokens(tok, solution)
    return make_example(policy_prompt(tok, question), ids + [tok.eos_id], step_ends=ends, labels=labels)


def _orm_example(tok: Tokenizer, r: Record) -> Example:
    # Every step carries the final outcome, so the head learns to predict from
    # any prefix whether this solution will end up right.
    solution = _solution(r)
    if "correct" in r and not isinstance(r["correct"], bool):
        raise DataError(f"the orm format needs 'correct' to be one boolean, got {r['correct']!r:.40}")
    correct = r["correct"] if "correct" in r else is_correct(solution, r["gold"])
    return value_example(tok, r["question"], solution, [float(correct)] * num_scorable_positions(solution))


register(PromptFormat(
    name="orm", fields=("question", "solution|answer", "correct|gold"), head="value",
    loss="the final outcome, at every step end", prompt=lambda tok, r: policy_prompt(tok, r["question"]),
    example=_orm_example))

register(PromptFormat(
    name="sorm", fields=("question", "solution|answer", "step_labels"), head="value",
    loss="each step's label (-1 = ignored), at its step end", prompt=lambda tok, r: policy_prompt(tok, r["question"]),
    example=lambda tok, r: value_example(tok, r["question"], _solution(r), [float(x) for x in r["step_labels"]])))


# ---- global refiner: (question, draft) -> a new solution -----------------------------------------

def global_refiner_prompt(tok: Tokenizer, question: str, draft: str) -> list[int]:
    return ([tok.bos_id] + tok.encode(question) + [tok.control_id("[DRAFT]")] + tok.encode(draft)
            + [tok.control_id("[FIX]")])


def global_refiner_example(tok: Tokenizer, question: str, draft: str, solution: str) -> Example:
    """Loss on the refined solution (and EOS) only."""
    return make_example(global_refiner_prompt(tok, question, draft), tok.encode(solution) + [tok.eos_id])


register(PromptFormat(
    name="global_refiner", fields=("question", "draft", "target"), head="lm", loss="the new solution and EOS",
    prompt=lambda tok, r: global_refiner_prompt(tok, r["question"], r["draft"]),
    example=lambda tok, r: global_refiner_example(tok, r["question"], r["draft"], r["target"])))


# ---- local refiner: a draft marked [BAD] at its first wrong step -> the rest ---------------------

def local_refiner_prompt(tok: Tokenizer, question: str, draft: str, bad_step: int) -> list[int]:
    kept = "".join(step + "\n" for step in solution_lines(draft).steps[:bad_step])
    return ([tok.bos_id] + tok.encode(question) + [tok.control_id("[DRAFT]")]
            + mark_bad_step(tok, draft, bad_step) + [tok.control_id("[FIX]")] + (tok.encode(kept) if kept else []))


def local_refiner_example(tok: Tokenizer, question: str, draft: str, bad_step: int,
                          continuation: str) -> Example:
    """Loss on `continuation` (the corrected steps from `bad_step` on, and the final line) and EOS."""
    return make_example(local_refiner_prompt(tok, question, draft, bad_step),
                        tok.encode(continuation) + [tok.eos_id])


register(PromptFormat(
    name="local_refiner", fields=("question", "draft", "bad_step", "target"), head="lm",
    loss="the target from the bad step on, and EOS",
    prompt=lambda tok, r: local_refiner_prompt(tok, r["question"], r["draft"], int(r["bad_step"])),
    example=lambda tok, r: local_refiner_example(tok, r["question"], r["draft"], int(r["bad_step"]),
                                                 local_continuation(r["target"], int(r["bad_step"])))))


# ---- one refiner for both kinds: a record with `bad_step` is a local pair, else a global one ----------

register(PromptFormat(
    name="refiner", fields=("question", "draft", "target"), head="lm",
    loss="as global_refiner, or as local_refiner for records with bad_step",
    prompt=lambda tok, r: get("local_refiner" if "bad_step" in r else "global_refiner").prompt(tok, r),
    example=lambda tok, r: get("local_refiner" if "bad_step" in r else "global_refiner").example(tok, r)))


# ---- self-correction (SCoRe): the policy's own first attempt, then a second turn -----------------

# SCoRe's second-turn instruction (Kumar et al. 2024, sec. 6: "There might be an error in the solution
# above because of lack of understanding of the question. Please correct the error, if any, and
# rewrite the solution."), shortened: on the demo's 1k-piece tokenizer the full sentence is 81 tokens,
# which would push the second attempt past the positions the policy was trained on.
SELF_CORRECT_INSTRUCTION = "There might be an error in the solution above. Please correct it, if any, and rewrite the solution."


def self_correct_prompt(tok: Tokenizer, first_prompt: Sequence[int], first_attempt: Sequence[int]) -> list[int]:
    """Turn 2's prompt from ids: turn 1's prompt, its attempt (without EOS), <eos>, the instruction, <SOL>.

    From ids, not text, so a rollout's turn-2 prompt holds exactly the sampled turn-1 tokens and one
    sequence carries both turns. The attempt's EOS ends turn 1 whether or not the sampler stopped.
    """
    attempt = list(first_attempt)
    if attempt and attempt[-1] == tok.eos_id:
        attempt = attempt[:-1]
    return (list(first_prompt) + attempt + [tok.eos_id] + tok.encode(SELF_CORRECT_INSTRUCTION)
            + [tok.control_id("[SOL]")])


def _self_correct_example(tok: Tokenizer, r: Record) -> Example:
    # Without a draft, the episode's first turn: the policy layout (a warm-up mixes both turns, so that
    # learning the second does not erase the first in a small model).
    first = policy_prompt(tok, r["question"])
    prompt = self_correct_prompt(tok, first, tok.encode(r["draft"])) if "draft" in r else first
    return make_example(prompt, tok.encode(r["target"]) + [tok.eos_id])


register(PromptFormat(
    name="self_correct", fields=("question", "target"), head="lm",
    loss="the attempt (the second, if the record has a draft) and EOS",
    prompt=lambda tok, r: (self_correct_prompt(tok, policy_prompt(tok, r["question"]), tok.encode(r["draft"]))
                           if "draft" in r else policy_prompt(tok, r["question"])),
    example=_self_correct_example))


# ---- LaTRO: question -> (a sampled rationale) -> the gold answer string --------------------------

# The answer string y whose log-likelihood after a sampled rationale is LaTRO's self-reward. `latro`
# is the official one; `latro_hash` is the answer line GSM8K and the synthetic task end their solutions
# with, so a policy trained on them scores the gold answer in the words it was trained to write.
LATRO_ANSWERS = {"latro": "The answer is {gold}.", "latro_hash": "#### {gold}"}
# Where a sampled rationale ends (the marker and what follows are dropped, then y is appended): the
# answer markers of both strings, as the official code stops at "The answer is" and its variants.
LATRO_STOPS = ("####", "The answer is", "the answer is", "Answer:")


def latro_answer(tok: Tokenizer, name: str, gold: str, *, line_start: bool = False) -> list[int]:
    """The ids of format `name`'s answer string for `gold`, EOS included (LaTRO's y).

    `line_start`: as the tokenizer writes it at the start of a line (after a rationale's last line break)
    rather than as a new word: sentencepiece prefixes a word with a space piece, and a policy scores a
    "####" that follows a line break in the pieces it was trained on, or it would pay ~20 nats for the
    spelling alone.
    """
    text = LATRO_ANSWERS[name].format(gold=gold)
    if line_start:
        head = tok.encode("\n")
        ids = tok.encode("\n" + text)
        if ids[:len(head)] == head:
            return ids[len(head):] + [tok.eos_id]
    return tok.encode(text) + [tok.eos_id]


for _name in LATRO_ANSWERS:
    register(PromptFormat(
        name=_name, fields=("question", "gold"), head="lm",
        loss=f"the answer string {LATRO_ANSWERS[_name]!r} and EOS (answer-only SFT; LaTRO's y)",
        prompt=lambda tok, r: policy_prompt(tok, r["question"]),
        example=lambda tok, r, _n=_name: make_example(policy_prompt(tok, r["question"]),
                                                      latro_answer(tok, _n, r["gold"])),
        stop=LATRO_STOPS, task_records=True))
