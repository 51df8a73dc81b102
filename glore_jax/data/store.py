"""Labelled records handed from one GLoRe stage to the next: a JSON-lines store.

A stage that samples (rollouts for SORM labels, drafts for the refiners)
writes its records here and the next stage's trainer reads them back as a
random-access source. JSON lines, because the records are small dicts of
mixed types (lists of labels, ints, bools) that a person debugging a stage
wants to read with `head`; the whole file is loaded into memory, which is
fine at GSM8K scale (about a hundred thousand records).

Each prompt format names the fields it reads (`glore_jax.prompts.formats`); extra
fields are kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

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

