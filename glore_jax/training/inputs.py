"""From a `DataConfig` to a tokenizer, record sources and batch iterators.

A source is any random-access sequence of record dicts: a TFDS task split,
a records file written by an earlier stage (`data.store`), or an in-memory
list handed in by the pipeline. Formats that need labelled records, on the
synthetic task with no records given, read `SyntheticLabelled`, so every
objective runs without a trained policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from jax.sharding import Mesh

from glore_jax import data, distributed, prompts
from glore_jax.errors import ConfigError
from glore_jax.data.labelled import SyntheticLabelled
from glore_jax.data.store import RecordsFile
from glore_jax.tokenizer import Tokenizer, train_tokenizer
from glore_jax.tasks import GENERATED_TASKS
from glore_jax.training.config import SYNTHETIC_KEYS, DataConfig

Source = Sequence[dict[str, Any]]


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The configured tokenizer, or for the synthetic task one trained once and cached by config."""
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    if cfg.task not in GENERATED_TASKS:
        raise ConfigError(f"data.tokenizer must name a sentencepiece model for task {cfg.task!r}; "
                         f"only the generated tasks {GENERATED_TASKS} train their own")
    knobs = ({k: getattr(cfg.synthetic, k) for k in SYNTHETIC_KEYS} if cfg.task == "synthetic"
             else dataclasses.asdict(cfg.programs))
    key = json.dumps({cfg.task: knobs, "vocab": cfg.tokenizer_vocab_size}, sort_keys=True)
    path = os.path.join(cfg.data_dir, "tokenizers", f"{cfg.task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.model")
    if os.path.exists(path):
        return Tokenizer.load(path)
    train = task_split(cfg, cfg.split or "train")
    texts = (text for r in train for text in (r["question"], r["answer"]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tokenizer = train_tokenizer(texts, cfg.tokenizer_vocab_size)
    tmp = f"{path}.{os.getpid()}.tmp"  # concurrent processes each write whole files
    with open(tmp, "wb") as f:
        f.write(tokenizer.serialized)
    os.replace(tmp, path)
    return tokenizer


def build_first_on_process_zero(cfg: DataConfig, splits: Sequence[str]) -> None:
    """Multi-process runs: process 0 builds the TFDS splits and trains the tokenizer, then the others read them.

    Two processes building one dataset directory at once would race; after
    this, every `task_split` / `load_tokenizer` call only reads.
    """
    import jax
    if jax.process_count() == 1:
        return
    if jax.process_index() == 0:
        load_tokenizer(cfg)
        for split in splits:
            if split:
                task_split(cfg, split)
    distributed.barrier("data built")


def task_split(cfg: DataConfig, split: str) -> Source:
    return data.load(cfg.task, split, cfg.data_dir, manual_dir=cfg.manual_dir or None, synthetic=cfg.synthetic,
                     programs=cfg.programs, skip_malformed=cfg.skip_bad_records)


def resolve_source(cfg: DataConfig, prompt_format: str, records: Source | str | None, split: str,
                   records_path: str, *, seed: int) -> Source | None:
    """records (list or path) > records_path from the config > the task split; None if none is set."""
    if records is not None:
        source = (RecordsFile(records, skip_bad=cfg.skip_bad_records) if isinstance(records, (str, os.PathLike))
                  else records)
    elif records_path:
        source = RecordsFile(records_path, skip_bad=cfg.skip_bad_records)
    elif split:
        source = task_split(cfg, split)
        if not prompts.get(prompt_format).task_records:
            if cfg.task != "synthetic":
                raise ConfigError(f"prompt format {prompt_format!r} needs labelled records for task "
                                 f"{cfg.task!r}: set data.records (or pass records=...)")
            source = SyntheticLabelled(source, seed=seed)
    else:
        return None
    prompts.get(prompt_format).check(source, name=getattr(source, "name", None) or type(source).__name__)
    return source


def batches(source: Source, prompt_format: str, tokenizer: Tokenizer, mesh: Mesh,
            pipeline: data.PipelineConfig) -> data.BatchIterator:
    return data.BatchIterator(source, prompts.Renderer(prompt_format, tokenizer), pipeline, mesh,
                              pad_id=tokenizer.pad_id)
