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

from absl import logging

from glore_jax import files, prompts
from glore_jax.errors import DataError, MissingPathError


def write_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Writes records atomically (a reader never sees half a file, even after a kill); returns how many."""
    lines = []
    for count, record in enumerate(records):
        if not isinstance(record, dict):
            raise TypeError(f"record {count} is a {type(record).__name__}, expected dict")
        lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
    files.write_atomic(path, "".join(lines))
    return len(lines)


class RecordsFile(Sequence):
    """A records file as a Grain-compatible random-access source, checked as it is read.

    Each line must be valid UTF-8 JSON of an object whose known fields have
    valid types (`prompts.check_record`: booleans are booleans, labels in
    [0, 1]). A bad line is a `DataError` naming the file, line and field;
    with `skip_bad` it is skipped instead, counted in `skipped`, and logged.
    """

    def __init__(self, path: str | os.PathLike, *, skip_bad: bool = False):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise MissingPathError(f"records file {self.path} does not exist")
        self._records: list[dict[str, Any]] = []
        self.skipped = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                record, why = _parse(raw)
                if why is not None:
                    if not skip_bad:
                        raise DataError(f"{self.path}:{lineno}: {why} (data.skip_bad_records=True skips such "
                                        "lines and counts them)")
                    self.skipped += 1
                    continue
                self._records.append(record)
        if self.skipped:
            logging.warning("%s: skipped %d bad records of %d", self.path, self.skipped,
                            self.skipped + len(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        return self._records[index]

    def __repr__(self) -> str:
        return f"RecordsFile({self.path}, {len(self)} records)"


def _parse(raw: bytes) -> tuple[Any, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    return record, prompts.check_record(record)
