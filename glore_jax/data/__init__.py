"""Data layer: TFDS array_record builders, record sources and batch pipelines.

    from glore_jax import data
    train = data.load("gsm8k", "train", data_dir, manual_dir="../shared/data/gsm8k")
    train[0]  # {'id', 'question', 'answer', 'gold', 'meta'}, all str
"""

from glore_jax.data.batching import (BATCH_KEYS, HOST_FIELDS, BatchIterator, PipelineConfig, collate, pad_example,
                                     process_rows, put_local)
from glore_jax.data.records import RECORD_FIELDS, MalformedRecordError, ReadStats, read_gsm8k_jsonl, read_svamp_json
from glore_jax.data.sources import RecordSource, load, make_builder
from glore_jax.data.store import RecordsFile, write_records

__all__ = [
    "BATCH_KEYS", "HOST_FIELDS", "put_local", "RECORD_FIELDS", "BatchIterator", "MalformedRecordError", "PipelineConfig", "ReadStats",
    "RecordSource", "collate", "load", "make_builder", "pad_example", "read_gsm8k_jsonl", "read_svamp_json",
    "process_rows", "RecordsFile", "write_records",
]
