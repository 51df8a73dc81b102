"""Train/test splits of a generated task: deterministic, and no test problem ever in train."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from glore_jax.errors import ConfigError


def disjoint_split(name: str, seed: int, sizes: dict[str, int], split: str, sample: Callable[[random.Random], Any],
                   key: Callable[[Any], Any], record: Callable[[Any, str, int], dict[str, str]]) -> Iterator[dict]:
    """Records of `split` ('train' or 'test'): `sample(rng)` draws a problem, `key` names the exercise it is
    (two problems with one key are the same whatever the wording), `record(problem, split, index)`
    renders it. Test is drawn first from its own stream; train skips every key test used (and its own
    repeats), so no test problem is ever trained on, and test does not change with train's size."""
    if split not in ("train", "test"):
        raise ConfigError(f"{name} splits are 'train' and 'test', got {split!r}")
    seen: set = set()
    for part in (("test", "train") if split == "train" else ("test",)):
        rng, size, count, attempts = random.Random(f"glore-{name}/{seed}/{part}"), sizes[part], 0, 0
        while count < size:
            attempts += 1
            if attempts > 20 * size + 1000:
                raise ConfigError(f"cannot find {size} distinct {name} problems for {part}; widen the config")
            problem = sample(rng)
            if key(problem) in seen:
                continue
            seen.add(key(problem))
            count += 1
            if part == split:
                yield record(problem, split, count - 1)
