"""From the config's `data` keys to a tokenizer, record sources and batch iterators.

A source is any random-access sequence of record dicts: a TFDS task split,
a records file written by an earlier stage (`data.store`), or an in-memory
list handed in by the pipeline. Value and refiner formats on the synthetic
task, with no records given, use `SyntheticLabelled`, so every objective runs
without a trained policy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from jax.sharding import Mesh
from ml_collections import ConfigDict

from glore_jax import data, prompts
from glore_jax.data.labelled import SyntheticLabelled
from glore_jax.data.store import RecordsFile
from glore_jax.tokenizer import Tokenizer, train_tokenizer
from glore_jax.training.config import synthetic_config

Source = Sequence[dict[str, Any]]


def data_dir(config: ConfigDict) -> str:
    return config.data.data_dir or os.path.join(config.workdir, "data")


def load_tokenizer(config: ConfigDict) -> Tokenizer:
    """The configured tokenizer, or for the synthetic task one trained once and cached by config."""
    if config.data.tokenizer:
        return Tokenizer.load(config.data.tokenizer)
    if config.data.task != "synthetic":
        raise ValueError(f"data.tokenizer must name a sentencepiece model for task {config.data.task!r}; "
                         "only the synthetic task trains its own")
    key = json.dumps({"synthetic": config.data.synthetic.to_dict(),
                      "vocab": config.data.tokenizer_vocab_size}, sort_keys=True)
    path = os.path.join(data_dir(config), "tokenizers",
                        f"synthetic-{hashlib.sha256(key.encode()).hexdigest()[:12]}.model")
    if os.path.exists(path):
        return Tokenizer.load(path)
    train = task_split(config, config.data.split or "train")
    texts = (text for r in train for text in (r["question"], r["answer"]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tokenizer = train_tokenizer(texts, config.data.tokenizer_vocab_size)
    tmp = f"{path}.{os.getpid()}.tmp"  # concurrent processes each write whole files
    with open(tmp, "wb") as f:
        f.write(tokenizer.serialized)
    os.replace(tmp, path)
    return tokenizer


def task_split(config: ConfigDict, split: str) -> Source:
    return data.load(config.data.task, split, data_dir(config), manual_dir=config.data.manual_dir or None,
                     synthetic=synthetic_config(config))


def resolve_source(config: ConfigDict, prompt_format: str, records: Source | str | None, split: str,
                   records_path: str) -> Source | None:
    """records (list or path) > records_path from the config > the task split; None if none is set."""
    if records is not None:
        source = RecordsFile(records) if isinstance(records, (str, os.PathLike)) else records
    elif records_path:
        source = RecordsFile(records_path)
    elif split:
        source = task_split(config, split)
        if not prompts.get(prompt_format).task_records:
            if config.data.task != "synthetic":
                raise ValueError(f"prompt format {prompt_format!r} needs labelled records for task "
                                 f"{config.data.task!r}: set data.records (or pass records=...)")
            source = SyntheticLabelled(source, seed=config.seed)
    else:
        return None
    prompts.get(prompt_format).check(source, name=getattr(source, "name", None) or type(source).__name__)
    return source


def batches(config: ConfigDict, source: Source, prompt_format: str, tokenizer: Tokenizer, mesh: Mesh, *,
            shuffle: bool = True, num_epochs: int | None = None) -> data.BatchIterator:
    pipeline = data.PipelineConfig(global_batch_size=config.train.batch_size, max_len=config.data.max_len,
                                   seed=config.seed, shuffle=shuffle, num_epochs=num_epochs)
    return data.BatchIterator(source, prompts.Renderer(prompt_format, tokenizer), pipeline, mesh,
                              pad_id=tokenizer.pad_id)
