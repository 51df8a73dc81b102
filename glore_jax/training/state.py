"""Train state, optimizer and the jitted train/eval steps, sharded on any mesh.

The step accumulates gradients of *summed* losses over micro-batches and
divides once by the total weight (see `objectives.base`), so grad_accum and
the mesh shape change nothing but floating-point summation order. A step
whose loss or gradient is not finite leaves the state untouched and says so
in `metrics['finite']`: the host then stops without ever holding (or
saving) poisoned params.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict

from glore_jax import sharding as shd
from glore_jax.models import ModelConfig, abstract_params, param_shardings
from glore_jax.objectives import Objective, finalize

END_LR_RATIO = 0.1  # cosine decays to 10% of the peak, as in LLaMA-style recipes


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 scalar: steps completed
    params: Any
    opt_state: Any
    rng: jax.Array        # uint32 raw key data (checkpointable as a plain array)


def schedule(config: ConfigDict) -> optax.Schedule:
    t = config.train
    warmup = min(t.warmup_steps, t.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
        decay_steps=max(t.total_steps, warmup + 1), end_value=t.learning_rate * END_LR_RATIO)


def optimizer(config: ConfigDict) -> optax.GradientTransformation:
    t = config.train
    # No decay on norm scales and biases (rank < 2), the usual AdamW recipe.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule(config), b1=0.9, b2=0.95, eps=1e-8, weight_decay=t.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw


def state_shardings(model: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of every state leaf: optimizer moments follow their params, the rest is replicated."""
    p_shard = param_shardings(model, mesh)
    abstract_opt = jax.eval_shape(tx.init, nn.unbox(abstract_params(model)))
    replicated = shd.replicated(mesh)
    opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: replicated,
                                      is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
    # A copy: the train step donates the state, and the caller's arrays (e.g.
    # a policy that several stages start from) must survive that.
    params = jax.device_put(params, shardings.params, may_alias=False)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def _micro_batches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    # Row i goes to micro-batch i % n: each device keeps its own rows, so the
    # split needs no communication (contiguous chunks would move data).
    def split(x):
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        return shd.constrain(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
    return {k: split(v) for k, v in batch.items()}


def make_train_step(objective: Objective, model: ModelConfig, tx: optax.GradientTransformation,
                    sched: optax.Schedule, mesh: Mesh, shardings: TrainState, grad_accum: int):
    """jit(state, batch) -> (state, metrics) with the state donated."""

    def grads_and_metrics(params, batch, rng):
        grad_fn = jax.grad(objective.loss_fn, has_aux=True)
        if grad_accum == 1:
            return grad_fn(params, batch, rng, model)
        micro = _micro_batches(batch, grad_accum)

        def body(carry, xs):
            i, mb = xs
            g, m = grad_fn(params, mb, jax.random.fold_in(rng, i), model)
            return jax.tree_util.tree_map(jnp.add, carry, (g, m)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda p, b, r: grad_fn(p, b, r, model), params, first, rng)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (g, m), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
        return g, m

    def step(state: TrainState, batch):
        with shd.activation_rules(mesh):
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            grads, metrics = grads_and_metrics(state.params, batch, rng)
            weight = jnp.maximum(metrics["loss"][1], 1.0)
            grads = jax.tree_util.tree_map(lambda g: g / weight, grads)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        out = finalize(metrics)
        finite = jnp.isfinite(out["loss"]) & jnp.isfinite(grad_norm)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
        out.update(grad_norm=grad_norm, learning_rate=sched(state.step), finite=finite,
                   tokens=jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32))
        return new, out

    batch_shard = shd.batch_sharding(mesh, 2)
    return jax.jit(step, in_shardings=(shardings, batch_shard), out_shardings=(shardings, shd.replicated(mesh)),
                   donate_argnums=0)


def make_eval_step(objective: Objective, model: ModelConfig, mesh: Mesh, params_sharding: Any):
    """jit(params, batch) -> summed metric pairs (add them over batches, then `finalize`)."""

    def step(params, batch):
        with shd.activation_rules(mesh):
            _, metrics = objective.loss_fn(params, batch, jax.random.key(0), model)
        return metrics

    return jax.jit(step, in_shardings=(params_sharding, shd.batch_sharding(mesh, 2)),
                   out_shardings=shd.replicated(mesh))
