"""Labelled records handed from one GLoRe stage to the next: a JSON-lines store.

A stage that samples (rollouts for SORM labels, drafts for the refiners)
writes its records here and the next stage's trainer reads them back as a
random-access source. JSON lines, because the records are small dicts of
mixed types (lists of labels, ints, bools) that a person debugging a stage
wants to read with `head`; the whole file is loaded into memory, which is
fine at GSM8K scale (about a hundred thousand records).

Fields, by the prompt format that reads them (extra fields are kept):
    policy          question, solution        (task records: `answer` stands in for solution)
    orm             question, solution, correct (bool)  (or gold, graded with tasks.is_correct)
    sorm            question, solution, step_labels (one float per step and final line; -1 = ignore)
    global_refiner  question, draft, target   (target: the full corrected solution)
    local_refiner   question, draft, bad_step (int, a `split_steps` index), target
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "policy": ("question", "solution"),
    "orm": ("question", "solution", "correct"),
    "sorm": ("question", "solution", "step_labels"),
    "global_refiner": ("question", "draft", "target"),
    "local_refiner": ("question", "draft", "bad_step", "target"),
}


def write_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Writes records atomically (a reader never sees half a file); returns how many."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, count = path + ".tmp", 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            if not isinstance(record, dict):
                raise TypeError(f"record {count} is a {type(record).__name__}, expected dict")
            f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


class RecordsFile(Sequence):
    """A records file as a Grain-compatible random-access source."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"records file {self.path} does not exist")
        self._records: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{self.path}:{lineno}: expected a JSON object")
                self._records.append(record)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        return self._records[index]

    def __repr__(self) -> str:
        return f"RecordsFile({self.path}, {len(self)} records)"


def check_fields(source: Sequence[dict[str, Any]], prompt_format: str, *, name: str = "source") -> None:
    """Fails early, naming the missing fields, rather than deep inside a Grain worker."""
    if prompt_format not in FORMAT_FIELDS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; valid formats: {sorted(FORMAT_FIELDS)}")
    if len(source) == 0:
        raise ValueError(f"{name} is empty")
    record = source[0]
    aliases = {"solution": ("answer",), "correct": ("gold",)}
    missing = [f for f in FORMAT_FIELDS[prompt_format]
               if f not in record and not any(a in record for a in aliases.get(f, ()))]
    if missing:
        raise ValueError(f"{name} records lack fields {missing} needed by prompt format {prompt_format!r}; "
                         f"record 0 has {sorted(record)}")
