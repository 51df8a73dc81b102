"""The training loop, callable in-process: `train(config, ...)` runs, resumes or skips one job.

    from glore_jax import trainer
    model_config, params = trainer.train(config, objective="sorm", records=labelled, init_from=policy_dir,
                                         workdir=f"{root}/sorm")

A job lives in its workdir (see `training.checkpoints`). Calling `train` on
a workdir with checkpoints resumes from the latest one, data order included;
on a finished workdir it loads and returns the final model without training.
SIGTERM (preemption) saves at the current step and raises `Preempted`; a
non-finite loss raises `NonFiniteLoss` and leaves the last good checkpoint
as the latest one.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections import ConfigDict

from glore_jax import models, objectives, sharding
from glore_jax.models import ModelConfig, checkpoints as model_checkpoints
from glore_jax.objectives import Objective
from glore_jax.training import config as train_config, inputs, metrics as metrics_lib, state as state_lib
from glore_jax.training.checkpoints import MODEL_DIR, Checkpoints, adapt_heads, grow_vocab, load_init

DONE_FILE = "train_done.json"
Params = Any


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint at `step`; rerun to resume."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step}; rerun with the same workdir to resume")
        self.step = step


class NonFiniteLoss(FloatingPointError):
    """A step produced a NaN/Inf loss or gradient; its update was discarded and nothing was saved."""


class _StopSignal:
    """Turns SIGTERM into a flag the loop polls; multi-host runs agree on the step through JAX."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # Each host gets SIGTERM at a different step; JAX's preemption
            # service picks one step at which all hosts save together.
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _abstract_state(model: ModelConfig, tx) -> state_lib.TrainState:
    params = nn.unbox(models.abstract_params(model))
    return state_lib.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, params),
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))


def _initial_model(config: ConfigDict, objective: Objective, tokenizer_vocab: int, mesh: Mesh,
                   init_params: tuple[ModelConfig, Params] | None) -> tuple[ModelConfig, Params]:
    rng = jax.random.key(config.seed)
    if init_params is None and not config.init_from:
        model = train_config.model_config(config, tokenizer_vocab).replace(heads=objective.heads)
        return model, models.init_params(model, rng, mesh)
    if init_params is not None:
        model, params = init_params[0], models.shard_params(init_params[0], init_params[1], mesh)
    else:
        model, params = load_init(config.init_from, mesh)
    model, params = adapt_heads(model, params, objective.heads, jax.random.fold_in(rng, 1), mesh)
    model, params = grow_vocab(model, params, tokenizer_vocab, mesh)
    # Compute-only knobs may change; shape knobs belong to the checkpoint.
    compute = {k: config.model[k] for k in train_config.COMPUTE_OVERRIDES if config.model[k] is not None}
    model = model.replace(**compute) if compute else model
    return model, params


def _evaluate(eval_step, params, eval_batches: Sequence[dict]) -> dict[str, float]:
    total = None
    for batch in eval_batches:
        m = eval_step(params, batch)
        total = m if total is None else jax.tree_util.tree_map(jnp.add, total, m)
    return {f"eval_{k}": float(v) for k, v in objectives.finalize(jax.device_get(total)).items()}


def train(config: ConfigDict, *, objective: str | Objective | None = None,
          records: Sequence[dict] | str | None = None, eval_records: Sequence[dict] | str | None = None,
          init_params: tuple[ModelConfig, Params] | None = None, init_from: str | None = None,
          workdir: str | None = None, mesh: Mesh | None = None) -> tuple[ModelConfig, Params]:
    """Runs (or resumes, or skips if finished) one training job; returns the final (model config, params).

    objective: a registered name (default `config.objective`) or an `Objective` instance.
    records / eval_records: the training / eval data as an in-memory list of record dicts or the path
        of a records file (`glore_jax.data.store`); default: `config.data.records` or the task split.
    init_params / init_from: start from these params, or from a saved model or earlier workdir
        (default `config.init_from`); ignored when the workdir already has checkpoints.
    """
    config = copy.deepcopy(config)
    if isinstance(objective, str):
        config.objective = objective
    if workdir is not None:
        config.workdir = workdir
    if init_from is not None:
        config.init_from = init_from
    train_config.check(config)
    obj = objective if isinstance(objective, Objective) else objectives.get(config.objective)
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh or sharding.make_mesh(train_config.mesh_config(config))
    t = config.train

    done_path = os.path.join(workdir, DONE_FILE)
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done["step"] >= t.total_steps:
            logging.info("%s already finished %d steps; loading its model instead of training", workdir, done["step"])
            return model_checkpoints.load_model(os.path.join(workdir, MODEL_DIR), mesh)

    tokenizer = inputs.load_tokenizer(config)
    prompt_format = obj.check_format(config.data.prompt_format)
    train_source = inputs.resolve_source(config, prompt_format, records, config.data.split, config.data.records)
    if train_source is None:
        raise ValueError("no training data: set data.split, data.records or pass records=...")
    eval_source = inputs.resolve_source(config, prompt_format, eval_records, config.data.eval_split,
                                        config.data.eval_records)

    ckpts = Checkpoints(workdir, max_to_keep=t.max_to_keep)
    latest = ckpts.latest_step()
    tx, sched = state_lib.optimizer(config), state_lib.schedule(config)
    data_state = None
    if latest is not None:
        info = ckpts.restore_info(latest)
        model = ModelConfig.from_dict(info["model_config"])
        shardings = state_lib.state_shardings(model, tx, mesh)
        state, data_state, _ = ckpts.restore(latest, _abstract_state(model, tx), shardings)
        logging.info("resuming %s from step %d", workdir, latest)
    else:
        model, params = _initial_model(config, obj, tokenizer.vocab_size, mesh, init_params)
        shardings = state_lib.state_shardings(model, tx, mesh)
        state = state_lib.init_state(params, tx, config.seed, shardings)
        del params
    info = {"model_config": json.loads(model.to_json()), "objective": obj.name, "prompt_format": prompt_format}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    batches = inputs.batches(config, train_source, prompt_format, tokenizer, mesh)
    if data_state is not None:
        batches.set_state(data_state)
    train_step = state_lib.make_train_step(obj, model, tx, sched, mesh, shardings, t.grad_accum)
    eval_step = state_lib.make_eval_step(obj, model, mesh, shardings.params)
    eval_batches: list[dict] = []
    if eval_source is not None:
        eval_iter = inputs.batches(config, eval_source, prompt_format, tokenizer, mesh, shuffle=False)
        eval_batches = [next(eval_iter) for _ in range(t.eval_batches)]

    start = int(jax.device_get(state.step))
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
    progress = metrics_lib.Progress(start, t.total_steps, desc=f"{obj.name}:{os.path.basename(workdir)}")
    stop = _StopSignal()
    flops_per_token = model.flops_per_token(config.data.max_len)
    peak = metrics_lib.peak_tflops(t.peak_tflops) * 1e12 * mesh.size
    host_rng = jax.random.key(config.seed + 1)
    window: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    last_saved = start if latest is not None else None
    try:
        pending = next(batches) if start < t.total_steps else None
        for step in range(start, t.total_steps):
            batch = pending
            if obj.prepare_batch is not None:
                batch = obj.prepare_batch(state, batch, jax.random.fold_in(host_rng, step))
            state, m = train_step(state, batch)
            data_state = batches.get_state()  # position after this step's batch
            # Fetching the next batch overlaps with the step running on device.
            pending = next(batches) if step + 1 < t.total_steps else None
            m = jax.device_get(m)
            done_steps = step + 1
            if not m.pop("finite"):
                kept = f"checkpoint at step {last_saved}" if last_saved is not None else "no checkpoint yet"
                raise NonFiniteLoss(
                    f"non-finite loss {m['loss']} or grad norm {m['grad_norm']} at step {done_steps}; the update "
                    f"was discarded and nothing was saved ({kept} is the last good state)")
            if step == start:  # the first step compiles; keep it out of the throughput window
                window_start, window_steps, window = time.perf_counter(), 0, {}
            else:
                window_steps += 1
                for k, v in m.items():
                    window[k] = window.get(k, 0.0) + float(v)
            logged = None
            if done_steps % t.log_every == 0 or done_steps == t.total_steps:
                logged = {k: float(v) for k, v in m.items() if k != "tokens"}
                elapsed = time.perf_counter() - window_start
                if window_steps and elapsed > 0:
                    padded = window_steps * t.batch_size * config.data.max_len
                    logged["tokens_per_sec"] = window["tokens"] / elapsed
                    logged["steps_per_sec"] = window_steps / elapsed
                    logged["mfu"] = flops_per_token * padded / elapsed / peak
                window_start, window_steps, window = time.perf_counter(), 0, {}
            if eval_batches and ((t.eval_every and done_steps % t.eval_every == 0) or done_steps == t.total_steps):
                logged = {**(logged or {}), **_evaluate(eval_step, state.params, eval_batches)}
            if logged is not None:
                writer.write(done_steps, logged)
            progress.update(done_steps, logged)
            stopping = stop.should_stop(done_steps)
            if done_steps % t.checkpoint_every == 0 or done_steps == t.total_steps or stopping:
                last_saved = ckpts.save(state, data_state, info)
            if stopping:
                ckpts.wait()
                logging.warning("SIGTERM: saved a checkpoint at step %d of %d in %s; exiting, rerun to resume",
                                done_steps, t.total_steps, workdir)
                raise Preempted(done_steps)
        ckpts.wait()
        model_checkpoints.save_model(os.path.join(workdir, MODEL_DIR), model, state.params)
        if jax.process_index() == 0:
            with open(done_path, "w") as f:
                json.dump({"step": t.total_steps, "objective": obj.name}, f)
        return model, state.params
    finally:
        stop.restore()
        progress.close()
        writer.close()
        ckpts.wait()
        ckpts.close()
