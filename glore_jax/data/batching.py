"""Fixed-shape batches and the per-process Grain pipeline that feeds them to a mesh.

Batch dict (every array [B, T], B the global batch, T = max_len):
    tokens         int32    ids, `pad_id` after the sequence
    loss_mask      float32  1 where the token is an LM target (see glore_jax.prompts)
    step_end_mask  float32  1 at the last token of each step and of the final line
    step_labels    float32  value targets at step ends, -1 elsewhere
    segment_ids    int32    1 on real tokens, 0 on padding; packed: 1, 2, ... per document
    positions      int32    0..len-1 on real tokens (per document when packed), 0 on padding
and, host-side only (lists of str, this process's rows), the record fields a
reward or a generation eval needs:
    id, gold       the record's `id` and `gold` ('' when the record has none);
                   packed: per row, the list of its documents' values
With `PipelineConfig.pack`, rows hold several examples each (`data.packing`).

Each JAX process reads only its own shard of the source (a strided slice,
equal-sized, remainder dropped), shuffles it with a per-epoch seed, formats
and pads examples, and forms its local batch; the global jax.Array is then
assembled with `make_array_from_process_local_data` under `batch_sharding`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from glore_jax.errors import ConfigError
from glore_jax.data.packing import ROW_KEYS, Packer
from glore_jax.prompts import Example, fit
from glore_jax.sharding import batch_sharding

BATCH_KEYS = ("tokens", "loss_mask", "step_end_mask", "step_labels", "segment_ids", "positions")
HOST_FIELDS = ("id", "gold")
_STAT_KEYS = ("examples", "prompt_truncated", "target_truncated")


def put_local(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of each array -> global arrays, the batch axis sharded over data and fsdp.

    Any rank works: axis 0 is the batch, the others stay whole.
    """
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


def pad_example(example: Example, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example's [T] row arrays; the example must already fit (see `prompts.fit`)."""
    n = len(example)
    if n > max_len:
        raise ValueError(f"example of length {n} exceeds max_len {max_len}; call prompts.fit first")
    row = {"tokens": np.full(max_len, pad_id, np.int32), "loss_mask": np.zeros(max_len, np.float32),
           "step_end_mask": np.zeros(max_len, np.float32), "step_labels": np.full(max_len, -1.0, np.float32),
           "segment_ids": np.zeros(max_len, np.int32), "positions": np.zeros(max_len, np.int32)}
    row["tokens"][:n] = example.tokens
    row["loss_mask"][:n] = example.loss_mask
    row["step_end_mask"][:n] = example.step_end_mask
    row["step_labels"][:n] = example.step_labels
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    return row


def collate(examples: Sequence[Example], max_len: int, pad_id: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Fits and pads examples into a [B, T] batch; also returns truncation counts."""
    stats = dict.fromkeys(_STAT_KEYS, 0)
    rows = []
    for example in examples:
        fitted = fit(example, max_len)
        stats["examples"] += 1
        stats["prompt_truncated"] += fitted.prompt_truncated
        stats["target_truncated"] += fitted.target_truncated
        rows.append(pad_example(fitted.example, max_len, pad_id))
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}, stats


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How a source becomes batches. `global_batch_size` counts all processes."""

    global_batch_size: int
    max_len: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    pack: bool = False             # several examples per row, each its own segment (see data.packing)

    def __post_init__(self):
        if self.global_batch_size <= 0 or self.max_len <= 0:
            raise ValueError(f"batch size and max_len must be positive, got {self}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {self.num_epochs}")


# How far the input pipeline reads ahead. Grain's default (16 threads, 500 elements) formats up to
# 500 batches that a short stage never trains on (the smoke pipeline's 20-step stages: most of its
# Python thread samples). The step runs in XLA without the GIL, so a few batches prepared by two
# threads keep it fed: the demo's policy stage took the same time either way (192 vs 200 s, noise).
PREFETCH_THREADS, PREFETCH_BATCHES = 2, 4


class _GlobalRow:
    """Local position j -> this process's share of global batch j // local (picklable)."""

    def __init__(self, dataset: grain.MapDataset, process_index: int, local: int, process_count: int):
        self.dataset, self.offset, self.local, self.glob = dataset, process_index * local, local, local * process_count

    def __call__(self, j: int):
        return self.dataset[(j // self.local) * self.glob + self.offset + j % self.local]


def process_rows(dataset: grain.MapDataset, process_index: int, process_count: int,
                 local_batch: int) -> grain.MapDataset:
    """The rows this process feeds of each global batch, read lazily from the global order.

    Global batch b is positions [b*G, (b+1)*G) of `dataset` (already shuffled
    and repeated with one seed on every process); process p reads only rows
    [b*G + p*L, b*G + (p+1)*L). So 1 process x 8 devices and 2 processes x 4
    devices train on identical global batches (the multi-process test
    compares their losses), and no process formats another's records.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    glob = local_batch * process_count
    n_local = (len(dataset) // glob) * local_batch  # a partial last global batch is dropped on every process
    return grain.MapDataset.range(0, n_local).map(_GlobalRow(dataset, process_index, local_batch, process_count))


class _FormatRow:
    """Grain map: record -> padded row (unpadded with `pad=False`) plus its truncation flags (picklable)."""

    def __init__(self, format_fn: Callable[[dict], Example], max_len: int, pad_id: int, pad: bool = True):
        self.format_fn, self.max_len, self.pad_id, self.pad = format_fn, max_len, pad_id, pad

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        fitted = fit(self.format_fn(record), self.max_len)
        ex = fitted.example
        row = (pad_example(ex, self.max_len, self.pad_id) if self.pad else
               {k: getattr(ex, k) for k in ROW_KEYS})
        row["prompt_truncated"] = np.asarray(fitted.prompt_truncated)
        row["target_truncated"] = np.asarray(fitted.target_truncated)
        for key in HOST_FIELDS:
            row[key] = np.asarray(str(record.get(key, "")))
        return row


class BatchIterator:
    """Iterator of global batches; `get_state`/`set_state` resume it exactly.

    `stats` counts examples served and how many were truncated (prompt cut
    from the left, or target cut at its end); they are part of the state, so
    a resumed run keeps counting where the checkpointed one stopped.
    """

    def __init__(self, source: Sequence[dict], format_fn: Callable[[dict], Example], config: PipelineConfig,
                 mesh: Mesh, *, pad_id: int, process_index: int | None = None, process_count: int | None = None):
        self.config, self.mesh = config, mesh
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if config.global_batch_size % process_count:
            raise ConfigError(f"global batch {config.global_batch_size} not divisible by {process_count} processes")
        self.local_batch_size = config.global_batch_size // process_count
        if len(source) < config.global_batch_size:
            raise ConfigError(f"source of {len(source)} records is fewer than one global batch of "
                              f"{config.global_batch_size}")
        dataset = grain.MapDataset.source(source)
        if config.shuffle:
            dataset = dataset.shuffle(seed=config.seed)
        dataset = dataset.repeat(config.num_epochs)  # reseeds the shuffle each epoch
        dataset = process_rows(dataset, process_index, process_count, self.local_batch_size)
        dataset = dataset.map(_FormatRow(format_fn, config.max_len, pad_id, pad=not config.pack))
        if config.pack:
            rows_ahead = grain.ReadOptions(num_threads=PREFETCH_THREADS,
                                           prefetch_buffer_size=PREFETCH_BATCHES * self.local_batch_size)
            self._iter = Packer(iter(dataset.to_iter_dataset(rows_ahead)), self.local_batch_size, config.max_len,
                                pad_id)
        else:
            dataset = dataset.batch(self.local_batch_size, drop_remainder=True)
            self._iter = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=PREFETCH_THREADS,
                                                                        prefetch_buffer_size=PREFETCH_BATCHES)))
        self.stats = dict.fromkeys(_STAT_KEYS, 0)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        if self.config.pack:
            local, rows = self._iter.next()
            docs = [ex for row in rows for ex in row]
            host = {k: [[str(ex[k]) for ex in row] for row in rows] for k in HOST_FIELDS}
            flags = {k: sum(int(ex[k]) for ex in docs) for k in ("prompt_truncated", "target_truncated")}
            self.stats["examples"] += len(docs)
        else:
            local = next(self._iter)
            host = {k: [str(x) for x in local[k]] for k in HOST_FIELDS}
            flags = {k: int(local[k].sum()) for k in ("prompt_truncated", "target_truncated")}
            self.stats["examples"] += int(local["tokens"].shape[0])
        for k, v in flags.items():
            self.stats[k] += v
        return {**put_local(self.mesh, {k: local[k] for k in BATCH_KEYS}), **host}

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iter.get_state(), "stats": dict(self.stats)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iter.set_state(state["grain"])
        self.stats = {k: int(state["stats"][k]) for k in _STAT_KEYS}
