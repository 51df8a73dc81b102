"""What an objective is: a loss over a batch, the heads it trains, and its default prompt format.

Losses return *sums*, not means. A metric is a `(sum, count)` pair; the
trainer adds pairs across micro-batches (and XLA across data-parallel
shards) and divides once at the end, so gradient accumulation and any mesh
give exactly the mean over the whole global batch. `metrics['loss']` must be
the `(loss_sum, weight)` pair whose first element is the returned loss.

A loss is `loss_fn(params, batch, rng, model, frozen)`: `frozen` maps each
of the objective's `FrozenSpec` names to its pytree (e.g. a reference
policy for a KL term); objectives that declare none ignore it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from glore_jax import prompts
from glore_jax.errors import ConfigError
from glore_jax.models import ModelConfig

Batch = dict[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[[Any, Batch, jax.Array, ModelConfig, dict[str, Any]], tuple[jax.Array, Metrics]]


def _same(params: Any) -> Any:
    return params


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrozenSpec:
    """A pytree the loss reads but never trains, kept in `TrainState.frozen[name]`.

    It is derived from the run's initial params (`derive`; by default they are
    the reference policy itself) and sharded like them. With `checkpoint`,
    it is saved in every checkpoint; without, it is derived again on resume,
    which is exact because the initial params are reproducible (`init_from`,
    the caller's `init_params`, or the seeded init).
    """

    name: str
    derive: Callable[[Any], Any] = _same
    checkpoint: bool = False


def reference_derive(path: str) -> Callable[[Any], Any]:
    """A `FrozenSpec.derive` for a KL reference: the run's initial params ('' ), or the model saved at
    `path` (a model dir or workdir), sharded like them. SCoRe's stage II and LaTRO runs that start from
    another run's model keep the base policy as their reference this way."""
    if not path:
        return _same

    def load(params):
        from glore_jax.training.checkpoints import load_init  # late: checkpoints import the trainer's pieces
        mesh = jax.tree_util.tree_leaves(params)[0].sharding.mesh
        return load_init(path, mesh)[1]
    return load


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    """One trainable objective. Register it in `glore_jax.objectives.OBJECTIVES`."""

    name: str
    loss_fn: LossFn
    heads: tuple[str, ...]               # model heads the loss reads: ('lm',) or ('value',)
    default_format: str                  # a `glore_jax.prompts` format; any format training these heads works
    frozen: tuple[FrozenSpec, ...] = ()  # pytrees the loss reads besides the trained params
    # The experience it needs, `run -> ExperienceSource` (None: the configured records, batched), and
    # what judges it, `run -> Evaluator | None` (None: the loss on held-out batches).
    experience: Callable[[Any], Any] | None = None
    evaluate: Callable[[Any], Any] | None = None

    def check_format(self, prompt_format: str) -> str:
        """The format to use ('' means the default), or an error naming the valid ones."""
        name = prompt_format or self.default_format
        if prompts.get(name).head not in self.heads:
            valid = sorted(n for n, f in prompts.FORMATS.items() if f.head in self.heads)
            raise ConfigError(f"objective {self.name!r} cannot train on prompt format {name!r} (it trains the "
                             f"{prompts.get(name).head!r} head); valid formats: {valid}")
        return name


def pair(total: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)


def finalize(metrics: Metrics) -> dict[str, jax.Array]:
    """Means of summed metric pairs; a metric with no contributing units reads 0."""
    return {k: s / jnp.maximum(c, 1.0) for k, (s, c) in metrics.items()}
