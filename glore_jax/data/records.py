"""Raw files -> glore_jax records, with loud errors for malformed input.

Record schema, shared by all tasks (every field a str):
    id        unique within the task, e.g. 'gsm8k-train-000042'
    question  the problem text
    answer    reference solution in GSM8K layout (steps per line, `#### N`);
              '' when the source has none (SVAMP)
    gold      the final answer as a normalised number ('18', '2.5')
    meta      JSON object with task-specific structure: the synthetic task's
              per-step values, SVAMP's equation and type; '{}' for GSM8K
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

from glore_jax.errors import DataError
from glore_jax.tasks.answers import extract_answer, format_number, normalize_number, parse_number

RECORD_FIELDS = ("id", "question", "answer", "gold", "meta")


class MalformedRecordError(DataError):
    """A source line or entry that cannot become a record; the message names file and line."""


@dataclasses.dataclass
class ReadStats:
    """Counts from reading one source file (mutable: filled while reading)."""

    read: int = 0
    skipped_malformed: int = 0


def _fail(path: str | os.PathLike, where: str, why: str) -> MalformedRecordError:
    return MalformedRecordError(f"{os.fspath(path)}:{where}: {why}")


def read_gsm8k_jsonl(path: str | os.PathLike, *, split: str, skip_malformed: bool = False,
                     stats: ReadStats | None = None) -> Iterator[dict[str, str]]:
    """GSM8K-style jsonl: one {"question", "answer"} object per line, answer ending in `#### N`.

    A malformed line raises MalformedRecordError naming `path:line`, unless
    `skip_malformed`, in which case it is skipped and counted in `stats`.
    """
    stats = stats if stats is not None else ReadStats()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = _gsm8k_record(_utf8(raw), index=stats.read, split=split)
            except MalformedRecordError as e:
                if not skip_malformed:
                    raise _fail(path, f"line {lineno}", str(e)) from None
                stats.skipped_malformed += 1
                continue
            stats.read += 1
            yield record


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedRecordError(f"invalid UTF-8 at byte {e.start}") from None


def _gsm8k_record(line: str, *, index: int, split: str) -> dict[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise MalformedRecordError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise MalformedRecordError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("question", "answer"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise MalformedRecordError(f"missing or non-string field {key!r}")
    gold = normalize_number(extract_answer(obj["answer"]) or "")
    if gold is None:
        raise MalformedRecordError("answer has no numeric '#### N' final line")
    return {"id": f"gsm8k-{split}-{index:06d}", "question": obj["question"].strip(),
            "answer": obj["answer"].strip(), "gold": gold, "meta": "{}"}


def read_svamp_json(path: str | os.PathLike, *, skip_malformed: bool = False,
                    stats: ReadStats | None = None) -> Iterator[dict[str, str]]:
    """SVAMP.json (a JSON list). question = Body + ' ' + Question; no reference solution."""
    stats = stats if stats is not None else ReadStats()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        entries = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise _fail(path, f"line {line}", f"invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"line {e.lineno}", f"invalid JSON ({e.msg})") from None
    if not isinstance(entries, list):
        raise _fail(path, "line 1", "expected a JSON list of problems")
    for k, entry in enumerate(entries):
        try:
            record = _svamp_record(entry)
        except MalformedRecordError as e:
            if not skip_malformed:
                raise _fail(path, f"entry {k}", str(e)) from None
            stats.skipped_malformed += 1
            continue
        stats.read += 1
        yield record


def _svamp_record(entry: object) -> dict[str, str]:
    if not isinstance(entry, dict):
        raise MalformedRecordError("expected a JSON object")
    for key in ("ID", "Body", "Question", "Equation"):
        if not isinstance(entry.get(key), str):
            raise MalformedRecordError(f"missing or non-string field {key!r}")
    answer = entry.get("Answer")
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise MalformedRecordError("missing or non-numeric 'Answer'")
    # json gives floats like 51.0 or 3.3333333333; repr keeps all their digits.
    value = parse_number(repr(answer) if isinstance(answer, float) else str(answer))
    if value is None:
        raise MalformedRecordError(f"unparseable Answer {answer!r}")
    body, question = entry["Body"].strip(), entry["Question"].strip()
    meta = {"equation": entry["Equation"].strip(), "type": str(entry.get("Type", ""))}
    return {"id": f"svamp-{entry['ID']}", "question": f"{body} {question}".strip(), "answer": "",
            "gold": format_number(value), "meta": json.dumps(meta, sort_keys=True)}
