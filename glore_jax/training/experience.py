"""Experience sources: where the training loop gets each step's batch.

The loop asks a source for the batch of step `step`, handing it the current
params, so an on-policy source can sample from the policy being trained
(rollouts for RL) while an offline source ignores them and reads a dataset:

    class ExperienceSource(Protocol):
        def next(self, params, step: int, rng: jax.Array) -> Batch: ...
        def state(self) -> dict: ...            # JSON-able; saved in every checkpoint
        def restore(self, state: dict) -> None: ...

A source that reads the objective's frozen trees (LaTRO: the reference
policy's log-probs are part of its reward) sets `reads_frozen = True`; the
loop then calls `next(params, step, rng, frozen=...)` with the current
state's trees.

A batch is a dict. Its `jax.Array` values (any rank, axis 0 the global
batch) go to the jitted step; everything else (lists of ids, gold answers,
reward breakdowns: this process's rows) stays on the host for the source's
own bookkeeping and for logging. `state()` must hold whatever makes `next`
reproducible after a restart (a dataset position, a prompt cursor); the
`rng` handed in is derived from the run's seed and the step, so a source
that samples with it draws the same batch on resume without saving keys.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from glore_jax.data.batching import BatchIterator

Batch = dict[str, Any]


class ExperienceSource(Protocol):
    def next(self, params: Any, step: int, rng: jax.Array) -> Batch: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


class OfflineSource:
    """A dataset as an experience source: the params are not needed, the data order is resumable."""

    def __init__(self, batches: BatchIterator):
        self.batches = batches

    def next(self, params: Any, step: int, rng: jax.Array) -> Batch:
        del params, step, rng
        return next(self.batches)

    def state(self) -> dict[str, Any]:
        return self.batches.get_state()

    def restore(self, state: dict[str, Any]) -> None:
        self.batches.set_state(state)

    @property
    def stats(self) -> dict[str, int]:
        """Examples served and how many were truncated (see `BatchIterator`)."""
        return dict(self.batches.stats)


def device_arrays(batch: Batch) -> dict[str, jax.Array]:
    """The part of a batch the jitted step reads: its jax.Array values."""
    return {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
