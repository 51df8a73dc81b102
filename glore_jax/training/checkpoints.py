"""Resumable training checkpoints, and where `init_from` finds a model.

A workdir holds
    checkpoints/<step>/{params, opt_state, rng, data, info[, frozen]}   Orbax, async, atomic per step
    model/                                                    the final saved model (models.checkpoints)
`params` and `opt_state` are separate items so a later stage can restore the
params alone without knowing the earlier stage's optimizer; `data` is the
experience source's JSON state, so a resumed run sees exactly the batches the
uninterrupted run would have; `info` records the model config and objective;
`frozen` holds the frozen trees whose `FrozenSpec` asks to be saved.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from glore_jax import models
from glore_jax.models import ModelConfig, checkpoints as model_checkpoints
from glore_jax.training.config import round_vocab
from glore_jax.training.state import TrainState

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
_ITEMS = ("params", "opt_state", "rng", "data", "info", "frozen")


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpoints:
    """The workdir's CheckpointManager, with the train state split into its items."""

    def __init__(self, workdir: str, *, max_to_keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_state: dict, info: dict, *, frozen: tuple[str, ...] = ()) -> int:
        """Starts an async save of `state` at its step; arrays are copied off-device before it returns.

        `frozen`: the names of `state.frozen` trees to save (the others are derived again on resume).
        """
        step = int(jax.device_get(state.step))
        items = dict(params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
                     rng=ocp.args.StandardSave({"key": state.rng}),  # Standard* takes trees, not bare arrays
                     data=ocp.args.JsonSave(data_state), info=ocp.args.JsonSave({**info, "frozen": list(frozen)}))
        if frozen:
            items["frozen"] = ocp.args.StandardSave({k: state.frozen[k] for k in frozen})
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        return step

    def restore_info(self, step: int) -> dict:
        return dict(self._manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore())).info)

    def restore(self, step: int, like: TrainState, shardings: TrainState) -> tuple[TrainState, dict, dict]:
        """(state, data iterator state, info) at `step`, each array straight into its sharding.

        `state.frozen` holds only the trees this checkpoint saved (`info['frozen']`).
        """
        info = self.restore_info(step)
        saved = [k for k in info.get("frozen", []) if k in like.frozen]
        target = _abstract(like, shardings)
        items = dict(params=ocp.args.StandardRestore(target.params),
                     opt_state=ocp.args.StandardRestore(target.opt_state),
                     rng=ocp.args.StandardRestore({"key": target.rng}), data=ocp.args.JsonRestore())
        if saved:
            items["frozen"] = ocp.args.StandardRestore({k: target.frozen[k] for k in saved})
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        step_array = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), shardings.step)
        state = TrainState(step=step_array, params=out.params, opt_state=out.opt_state, rng=out.rng["key"],
                           frozen=dict(out.frozen) if saved else {})
        return state, dict(out.data), info

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _latest_checkpoint_params(workdir: str, mesh: Mesh) -> tuple[ModelConfig, Any]:
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    with ocp.CheckpointManager(directory, item_names=_ITEMS) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint")
        info = manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore())).info
        config = ModelConfig.from_dict(info["model_config"])
        target = _abstract(nn.unbox(models.abstract_params(config)), models.param_shardings(config, mesh))
        params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    return config, params


def load_init(path: str, mesh: Mesh) -> tuple[ModelConfig, Any]:
    """A model from a saved-model dir, a finished stage's workdir, or its latest checkpoint."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, model_checkpoints.CONFIG_FILE)):
        return model_checkpoints.load_model(path, mesh)
    if os.path.exists(os.path.join(path, MODEL_DIR, model_checkpoints.CONFIG_FILE)):
        return model_checkpoints.load_model(os.path.join(path, MODEL_DIR), mesh)
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return _latest_checkpoint_params(path, mesh)
    raise FileNotFoundError(f"init_from {path}: found neither {model_checkpoints.CONFIG_FILE} (a saved model), "
                            f"{MODEL_DIR}/ (a finished workdir) nor {CHECKPOINT_DIR}/ (a workdir in progress)")


def grow_vocab(config: ModelConfig, params: Any, vocab_size: int, mesh: Mesh) -> tuple[ModelConfig, Any]:
    """Adds embedding (and LM head) rows so `vocab_size` ids fit; old rows are untouched.

    A converted LLaMA/Mistral checkpoint has 32,000 rows but glore_jax's
    control tokens sit after the sentencepiece vocab. New rows start at the
    mean embedding, the usual choice: their logits begin at the average
    token's, neither dominant nor dead.
    """
    if config.vocab_size >= vocab_size:
        return config, params
    new = config.replace(vocab_size=round_vocab(vocab_size))
    extra = new.vocab_size - config.vocab_size

    def grow(params):
        backbone = dict(params["backbone"])
        emb = backbone["embedding"]
        backbone["embedding"] = jnp.concatenate([emb, jnp.repeat(emb.mean(0, keepdims=True), extra, 0)], 0)
        out = {**params, "backbone": backbone}
        if "lm_head" in params:
            kernel = params["lm_head"]["kernel"]
            out["lm_head"] = {"kernel": jnp.concatenate(
                [kernel, jnp.repeat(kernel.mean(1, keepdims=True), extra, 1)], 1)}
        return out

    return new, jax.jit(grow, out_shardings=models.param_shardings(new, mesh))(params)


def adapt_heads(config: ModelConfig, params: Any, heads: tuple[str, ...], rng: jax.Array,
                mesh: Mesh) -> tuple[ModelConfig, Any]:
    """Gives a loaded model the heads an objective trains: a policy becomes a value model with a fresh head."""
    if all(h in config.heads for h in heads):
        return config, params
    if heads == ("value",):
        config, params = models.value_model_from_policy(config, params, rng)
        return config, models.shard_params(config, params, mesh)
    raise ValueError(f"cannot train heads {heads} starting from a model with heads {config.heads}")
