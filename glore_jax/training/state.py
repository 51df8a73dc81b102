"""Train state, optimizer and the jitted train/eval steps, sharded on any mesh.

`TrainState.frozen` holds the pytrees an objective reads but never trains
(e.g. a reference policy), as its `FrozenSpec`s declare; they are sharded
like the policy's params and pass through every step untouched.

The step accumulates gradients of *summed* losses over micro-batches and
divides once by the total weight (see `objectives.base`), so grad_accum and
the mesh shape change nothing but floating-point summation order. A step
whose loss or gradient is not finite leaves the state untouched and says so
in `metrics['finite']`: the host then stops without ever holding (or
saving) poisoned params.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from glore_jax import hardware, sharding as shd
from glore_jax.models import ModelConfig, abstract_params, init_params, param_shardings
from glore_jax.objectives import Objective, finalize
from glore_jax.training.config import TrainConfig

END_LR_RATIO = 0.1  # cosine decays to 10% of the peak, as in LLaMA-style recipes


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 scalar: steps completed
    params: Any
    opt_state: Any
    rng: jax.Array        # uint32 raw key data (checkpointable as a plain array)
    frozen: dict[str, Any]  # name -> pytree, as the objective's FrozenSpecs declare; never updated


def schedule(t: TrainConfig) -> optax.Schedule:
    warmup = min(t.warmup_steps, t.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
        decay_steps=max(t.total_steps, warmup + 1), end_value=t.learning_rate * END_LR_RATIO)


class ParamEmaState(NamedTuple):
    count: jax.Array      # int32: updates averaged so far
    ema: Any              # a params-shaped tree: sharded, checkpointed and restored like the moments


def param_ema(decay: float) -> optax.GradientTransformation:
    """Passes updates through and keeps an exponential moving average of the params they produce.

    Why: a short fine-tune at batch 32 ends on a noisy last iterate; on the demo the greedy accuracy
    of the same recipe moved by 20 points between seeds. The average is the model the run hands on
    (`model_params`). It lives in the optimizer state, so it is sharded like the params, skipped with
    them on a non-finite step and resumed exactly. The decay ramps up as min(decay, (1+n)/(10+n)), so
    the average forgets the initial params quickly rather than by decay**steps.
    """
    def init(params):
        return ParamEmaState(count=jnp.zeros((), jnp.int32), ema=params)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("param_ema needs the params in update()")
        new = optax.apply_updates(params, updates)
        n = state.count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree_util.tree_map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema, new)
        return updates, ParamEmaState(count=state.count + 1, ema=ema)

    return optax.GradientTransformation(init, update)


def optimizer(t: TrainConfig) -> optax.GradientTransformation:
    # No decay on norm scales and biases (rank < 2), the usual AdamW recipe.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule(t), b1=0.9, b2=0.95, eps=1e-8, weight_decay=t.weight_decay,
                        mask=decay_mask)
    chain = ([optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []) + [adamw] \
        + ([param_ema(t.ema_decay)] if t.ema_decay > 0 else [])
    return optax.chain(*chain) if len(chain) > 1 else adamw


def model_params(state: "TrainState") -> Any:
    """The params a run hands on: the EMA when the optimizer keeps one (train.ema_decay), else the params."""
    found = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: isinstance(x, ParamEmaState))
             if isinstance(s, ParamEmaState)]
    return found[0].ema if found else state.params


def state_shardings(model: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    frozen: tuple[str, ...] = ()) -> TrainState:
    """Shardings of every state leaf: optimizer moments and frozen trees follow the params, the rest is replicated."""
    p_shard = param_shardings(model, mesh)
    abstract_opt = jax.eval_shape(tx.init, nn.unbox(abstract_params(model)))
    replicated = shd.replicated(mesh)
    opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: replicated,
                                      is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated,
                      frozen={name: p_shard for name in frozen})


def abstract_state(model: ModelConfig, tx, frozen: tuple[str, ...]) -> TrainState:
    """Shapes and dtypes of a train state, for restoring into and for AOT compilation."""
    params = nn.unbox(abstract_params(model))
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, params),
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))), frozen={k: params for k in frozen})


def put_frozen(trees: dict[str, Any], shardings: TrainState) -> dict[str, Any]:
    # Copies, for the reason `init_state` copies params: the state is donated.
    return {k: jax.device_put(v, shardings.frozen[k], may_alias=False) for k, v in trees.items()}


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, shardings: TrainState,
               frozen: dict[str, Any] | None = None) -> TrainState:
    # A copy: the train step donates the state, and the caller's arrays (e.g.
    # a policy that several stages start from) must survive that.
    params = jax.device_put(params, shardings.params, may_alias=False)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng,
                      frozen=put_frozen(frozen or {}, shardings))


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

    def grads_and_metrics(params, frozen, batch, rng):
        grad_fn = jax.grad(objective.loss_fn, has_aux=True)
        if grad_accum == 1:
            return grad_fn(params, batch, rng, model, frozen)
        micro = _micro_batches(batch, grad_accum)

        def body(carry, xs):
            i, mb = xs
            g, m = grad_fn(params, mb, jax.random.fold_in(rng, i), model, frozen)
            return jax.tree_util.tree_map(jnp.add, carry, (g, m)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda p, b, r: grad_fn(p, b, r, model, frozen), params, first, rng)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (g, m), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
        return g, m

    def step(state: TrainState, batch):
        with shd.activation_rules(mesh):
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            grads, metrics = grads_and_metrics(state.params, state.frozen, batch, rng)
            weight = jnp.maximum(metrics["loss"][1], 1.0)
            grads = jax.tree_util.tree_map(lambda g: g / weight, grads)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        out = finalize(metrics)
        finite = jnp.isfinite(out["loss"]) & jnp.isfinite(grad_norm)
        trained = (state.step + 1, params, opt_state)
        kept = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), trained,
                                      (state.step, state.params, state.opt_state))
        new = TrainState(step=kept[0], params=kept[1], opt_state=kept[2], rng=state.rng, frozen=state.frozen)
        tokens = jnp.sum(batch["segment_ids"] > 0) if "segment_ids" in batch else jnp.zeros(())
        out.update(grad_norm=grad_norm, learning_rate=sched(state.step), finite=finite,
                   tokens=tokens.astype(jnp.float32))
        return new, out

    # No in_shardings: the state arrives in `shardings` and each batch array in the batch
    # sharding of its rank (`data.put_local`), and jit keeps what it is given.
    return jax.jit(step, out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=0,
                   compiler_options=hardware.train_compiler_options(mesh.devices.flat[0].platform,
                                                                    jnp.dtype(model.compute_dtype).name))


def make_eval_step(objective: Objective, model: ModelConfig, mesh: Mesh):
    """jit(params, frozen, batch) -> summed metric pairs (add them over batches, then `finalize`)."""

    def step(params, frozen, batch):
        with shd.activation_rules(mesh):
            _, metrics = objective.loss_fn(params, batch, jax.random.key(0), model, frozen)
        return metrics

    return jax.jit(step, out_shardings=shd.replicated(mesh))


def isolated_step(objective: Objective, model: ModelConfig, t: TrainConfig, seed: int = 0,
                    mesh: Mesh | None = None):
    """(jitted step, fresh state, mesh), built as the trainer builds them, on `mesh` (default: this
    process's first device).

    For what times or inspects one step in isolation (`benchmarks/train.py`, tests).
    """
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    tx = optimizer(t)
    shardings = state_shardings(model, tx, mesh)
    state = init_state(init_params(model, jax.random.key(seed)), tx, seed, shardings)
    return make_train_step(objective, model, tx, schedule(t), mesh, shardings, t.grad_accum), state, mesh
