"""Resumable training checkpoints, and where `init_from` finds a model.

A workdir holds
    checkpoints/<step>/{params, opt_state, rng, data, info[, frozen]}   Orbax, async, atomic per step,
                       glore_checksums.json                        with a checksum manifest
    checkpoints_corrupt/<step>-<time>-<pid>/                        steps that failed verification
    model/                                                    the final saved model (models.checkpoints)
`params` and `opt_state` are separate items so a later stage can restore the
params alone without knowing the earlier stage's optimizer; `data` is the
experience source's JSON state, so a resumed run sees exactly the batches the
uninterrupted run would have; `info` records the model config and objective;
`frozen` holds the frozen trees whose `FrozenSpec` asks to be saved.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from glore_jax import checksums, models
from glore_jax.errors import CheckpointError, ConfigError, MissingPathError
from glore_jax.models import ModelConfig, checkpoints as model_checkpoints
from glore_jax.training.config import round_vocab
from glore_jax.training.state import TrainState

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
CORRUPT_DIR = "checkpoints_corrupt"
_ITEMS = ("params", "opt_state", "rng", "data", "info", "frozen")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's unpublished step dirs: <step>.orbax-checkpoint-tmp-<time>
T = TypeVar("T")


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpoints:
    """The workdir's CheckpointManager, with the train state split into its items.

    Integrity: every step gets a checksum manifest (`glore_jax.checksums`)
    written inside Orbax's temp dir just before the rename that publishes it,
    so a published step always has one. `restore_newest` verifies it and
    moves a corrupt or unreadable step aside to `checkpoints_corrupt/`,
    logging why, and falls back to the newest intact step.
    """

    def __init__(self, workdir: str, *, max_to_keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self._saving: list[int] = []
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def _write_manifest(self) -> None:
        # Runs on Orbax's save thread after the step is finalized and before
        # its temp dir is renamed into place (or, on filesystems without
        # renames, before it is marked complete).
        step = self._saving[-1]
        if jax.process_index() != 0:
            return
        final = os.path.join(self.directory, str(step))
        pending = sorted(glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*")), key=os.path.getmtime)
        checksums.write_manifest(pending[-1] if pending else final)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

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
        self._manager.wait_until_finished()  # one save in flight, so the manifest callback knows its step
        self._saving = [step]
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

    def restore_newest(self, restore: Callable[[int], T], *, move_aside: bool = True) -> tuple[int, T] | None:
        """(step, restore(step)) for the newest step that verifies and restores; None if there are no steps.

        A step whose checksums fail, or whose restore raises, is reported by
        name and the next older step is tried; once one restores, the failed
        ones are moved to `checkpoints_corrupt/` (with `move_aside`: kept for
        inspection, and out of the way of the step numbers the resumed run
        will save again). If every step fails, nothing is moved
        and `CheckpointError` says what to do.
        """
        steps = self.all_steps()
        failures = []
        for step in reversed(steps):
            step_dir = os.path.join(self.directory, str(step))
            why = checksums.verify(step_dir) if checksums.has_manifest(step_dir) else None
            if why is None:
                try:
                    result = restore(step)
                    if failures and move_aside:
                        self.quarantine([s for s, _ in failures])
                    return step, result
                except Exception as e:  # noqa: BLE001  any failure to read a step means it is unusable
                    why = f"restore failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            failures.append((step, why))
            logging.warning("checkpoint step %d in %s is corrupt: %s; trying the next older step",
                            step, self.directory, why)
        if failures and len(failures) == len(steps):
            listed = "; ".join(f"step {s}: {why}" for s, why in failures)
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} ({listed}); to start this job over, move that "
                "directory away (or delete it), or put back an intact copy from a backup")
        return None

    def quarantine(self, steps: list[int]) -> None:
        """Moves steps aside to `checkpoints_corrupt/<step>` so a resumed run can save those numbers again."""
        if jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
                os.replace(os.path.join(self.directory, str(step)), target)
                logging.warning("moved corrupt checkpoint step %d to %s", step, target)
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _latest_checkpoint_params(workdir: str, mesh: Mesh) -> tuple[ModelConfig, Any]:
    ckpts = Checkpoints(workdir, max_to_keep=1_000_000)  # reading only: never deletes

    def params(step: int) -> tuple[ModelConfig, Any]:
        config = ModelConfig.from_dict(ckpts.restore_info(step)["model_config"])
        target = _abstract(nn.unbox(models.abstract_params(config)), models.param_shardings(config, mesh))
        restored = ckpts._manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        return config, restored.params

    try:
        found = ckpts.restore_newest(params, move_aside=False)  # another job's workdir: only read it
    finally:
        ckpts.close()
    if found is None:
        raise MissingPathError(f"{ckpts.directory} holds no complete checkpoint")
    return found[1]


def load_init(path: str, mesh: Mesh) -> tuple[ModelConfig, Any]:
    """A model from a saved-model dir, a finished stage's workdir, or its latest checkpoint."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, model_checkpoints.CONFIG_FILE)):
        return model_checkpoints.load_model(path, mesh)
    if os.path.exists(os.path.join(path, MODEL_DIR, model_checkpoints.CONFIG_FILE)):
        return model_checkpoints.load_model(os.path.join(path, MODEL_DIR), mesh)
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return _latest_checkpoint_params(path, mesh)
    raise MissingPathError(f"init_from {path}: found neither {model_checkpoints.CONFIG_FILE} (a saved model), "
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
    raise ConfigError(f"cannot train heads {heads} starting from a model with heads {config.heads}")
