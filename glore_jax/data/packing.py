"""Sequence packing: several examples per row, each its own segment, so rows carry few pad tokens.

A packed row holds documents one after another: `segment_ids` number them
1, 2, ... (0 = padding) and `positions` restart at 0 for each, so the model's
attention (same segment, earlier position) never crosses a document, and
each document's logits, values and losses are exactly those it would have
alone in a row (the losses are sums over target tokens, see `objectives`).

Packing is first-fit over the stream of fitted examples: each example goes
into the first row of the batch with room for it; the first example that
fits no row closes the batch and opens the next one. That example was read
but not yet placed, so the resumable state is the stream's position *before*
it: a restored iterator reads it again and builds the same batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ROW_KEYS = ("tokens", "loss_mask", "step_end_mask", "step_labels")


class Packer:
    """Packs a resumable stream of unpadded examples (dicts of [n] arrays) into [rows, max_len] batches."""

    def __init__(self, stream, rows: int, max_len: int, pad_id: int):
        self.stream, self.rows, self.max_len, self.pad_id = stream, rows, max_len, pad_id
        self._pending: tuple[Any, dict] | None = None   # (stream state before it, example)

    def _read(self) -> tuple[Any, dict]:
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        before = self.stream.get_state()
        return before, next(self.stream)

    def next(self) -> tuple[dict[str, np.ndarray], list[list[dict]]]:
        """One packed batch and, per row, the examples in it (for their flags and host fields)."""
        rows: list[list[dict]] = [[] for _ in range(self.rows)]
        room = [self.max_len] * self.rows
        placed: list[dict] = []
        while True:
            before, ex = self._read()
            n = len(ex["tokens"])
            slot = next((i for i, r in enumerate(room) if r >= n), None)
            if slot is None:
                if not placed:
                    raise ValueError(f"an example of {n} tokens does not fit a row of {self.max_len}")
                self._pending = (before, ex)
                break
            rows[slot].append(ex)
            room[slot] -= n
            placed.append(ex)
        return self._assemble(rows), rows

    def _assemble(self, rows: list[list[dict]]) -> dict[str, np.ndarray]:
        b, t = self.rows, self.max_len
        out = {"tokens": np.full((b, t), self.pad_id, np.int32), "loss_mask": np.zeros((b, t), np.float32),
               "step_end_mask": np.zeros((b, t), np.float32), "step_labels": np.full((b, t), -1.0, np.float32),
               "segment_ids": np.zeros((b, t), np.int32), "positions": np.zeros((b, t), np.int32)}
        for i, docs in enumerate(rows):
            start = 0
            for seg, ex in enumerate(docs, start=1):
                n = len(ex["tokens"])
                for k in ROW_KEYS:
                    out[k][i, start:start + n] = ex[k]
                out["segment_ids"][i, start:start + n] = seg
                out["positions"][i, start:start + n] = np.arange(n)
                start += n
        return out

    def get_state(self) -> Any:
        return self._pending[0] if self._pending is not None else self.stream.get_state()

    def set_state(self, state: Any) -> None:
        self.stream.set_state(state)
        self._pending = None

