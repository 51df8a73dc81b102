"""The training loop, callable in-process: `train(config, ...)` runs, resumes or skips one job.

    from glore_jax import trainer
    model_config, params = trainer.train(config, objective="sorm", records=labelled, init_from=policy_dir,
                                         workdir=f"{root}/sorm")

One batch's path: an experience source (`training.experience`: a dataset, or
an on-policy sampler that reads the current params) hands over a batch; the
jitted step (`training.state`) takes the objective's loss and its gradient
and updates the `TrainState`; the session logs metrics, runs the evaluators,
and saves the state with the source's position (`training.checkpoints`).

A job lives in its workdir. Calling `train` on a workdir with checkpoints
resumes from the latest one, data order included; on a finished workdir it
loads and returns the final model without training. SIGTERM (preemption)
saves at the current step and raises `Preempted`; a non-finite loss raises
`NonFiniteLoss` and leaves the last good checkpoint as the latest one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from glore_jax import data, files, models, objectives, sharding
from glore_jax.errors import ConfigError
from glore_jax.models import ModelConfig, checkpoints as model_checkpoints
from glore_jax.objectives import Objective
from glore_jax.tokenizer import Tokenizer
from glore_jax.training import config as train_config, inputs, state as state_lib
from glore_jax.training.checkpoints import MODEL_DIR, Checkpoints, adapt_heads, grow_vocab, load_init
from glore_jax.training.config import Experiment
from glore_jax.training.evals import Evaluator, LossEval
from glore_jax.training.experience import ExperienceSource, OfflineSource, device_arrays
from glore_jax.training.session import DONE_FILE, NonFiniteLoss, Preempted, Session

__all__ = ["DONE_FILE", "NonFiniteLoss", "Preempted", "Run", "done_info", "train"]
Params = Any


@dataclasses.dataclass
class Run:
    """What a job's parts are built from: its typed config, objective, mesh, tokenizer, model and data."""

    exp: Experiment
    objective: Objective
    prompt_format: str
    mesh: Mesh
    tokenizer: Tokenizer
    model: ModelConfig
    records: inputs.Source
    eval_records: inputs.Source | None

    def pipeline(self, *, shuffle: bool = True, pack: bool | None = None) -> data.PipelineConfig:
        return data.PipelineConfig(global_batch_size=self.exp.train.batch_size, max_len=self.exp.data.max_len,
                                   seed=self.exp.seed, shuffle=shuffle,
                                   pack=self.exp.data.pack if pack is None else pack)

    def offline(self) -> OfflineSource:
        """The default source: `records` formatted, shuffled each epoch, resumable."""
        return OfflineSource(inputs.batches(self.records, self.prompt_format, self.tokenizer, self.mesh,
                                            self.pipeline()))


def _experiment(config: ConfigDict | Experiment, objective: str | None, workdir: str | None,
                init_from: str | None) -> Experiment:
    """The typed config with the call's overrides applied (on the ConfigDict, so config.json shows them)."""
    if isinstance(config, Experiment):
        changes = {k: v for k, v in (("objective", objective), ("workdir", workdir and os.path.abspath(workdir)),
                                     ("init_from", init_from)) if v is not None}
        return config.replace(**changes)
    config = copy.deepcopy(config)
    for key, value in (("objective", objective), ("workdir", workdir), ("init_from", init_from)):
        if value is not None:
            config[key] = value
    return train_config.experiment(config)


def _initial_model(exp: Experiment, objective: Objective, tokenizer_vocab: int, mesh: Mesh,
                   init_params: tuple[ModelConfig, Params] | None) -> tuple[ModelConfig, Params]:
    """The job's starting point; deterministic, so frozen trees can be derived from it again on resume."""
    rng = jax.random.key(exp.seed)
    if init_params is None and not exp.init_from:
        model = exp.model.build(tokenizer_vocab).replace(heads=objective.heads)
        return model, models.init_params(model, rng, mesh)
    if init_params is not None:
        model, params = init_params[0], models.shard_params(init_params[0], init_params[1], mesh)
    else:
        model, params = load_init(exp.init_from, mesh)
    model, params = adapt_heads(model, params, objective.heads, jax.random.fold_in(rng, 1), mesh)
    model, params = grow_vocab(model, params, tokenizer_vocab, mesh)
    exp.model.check_loaded(model, "init_params" if init_params is not None else f"init_from {exp.init_from}")
    # Compute-only knobs may change; shape knobs belong to the checkpoint.
    compute = exp.model.compute()
    return (model.replace(**compute) if compute else model), params


def _start(exp: Experiment, obj: Objective, mesh: Mesh, tokenizer: Tokenizer, tx,
           init_params) -> tuple[ModelConfig, state_lib.TrainState, dict | None]:
    """(model, state, source state): from the latest checkpoint, or fresh from the initial model."""
    frozen_names = tuple(spec.name for spec in obj.frozen)
    derive = lambda params: {s.name: s.derive(params) for s in obj.frozen}  # noqa: E731
    ckpts = Checkpoints(exp.workdir, max_to_keep=exp.train.max_to_keep)

    def restore(step: int):
        info = ckpts.restore_info(step)
        model = ModelConfig.from_dict(info["model_config"])
        shardings = state_lib.state_shardings(model, tx, mesh, frozen_names)
        state, data_state, _ = ckpts.restore(step, state_lib.abstract_state(model, tx, frozen_names), shardings)
        return model, shardings, state, data_state

    try:
        found = ckpts.restore_newest(restore)
    finally:
        ckpts.close()
    if found is None:
        model, params = _initial_model(exp, obj, tokenizer.vocab_size, mesh, init_params)
        shardings = state_lib.state_shardings(model, tx, mesh, frozen_names)
        return model, state_lib.init_state(params, tx, exp.seed, shardings, derive(params)), None
    latest, (model, shardings, state, data_state) = found
    exp.model.check_loaded(model, f"the checkpoint at step {latest} in {exp.workdir}")
    model = model.replace(**exp.model.compute())  # compute knobs (dtype, remat) apply to a resumed run too
    missing = [n for n in frozen_names if n not in state.frozen]
    if missing:  # not saved: derive them again from the (reproducible) initial params
        initial = derive(_initial_model(exp, obj, tokenizer.vocab_size, mesh, init_params)[1])
        state = state.replace(frozen={**state.frozen, **state_lib.put_frozen(
            {n: initial[n] for n in missing}, shardings)})
    logging.info("resuming %s from step %d", exp.workdir, latest)
    return model, state, data_state


def train(config: ConfigDict | Experiment, *, objective: str | Objective | None = None,
          records: Sequence[dict] | str | None = None, eval_records: Sequence[dict] | str | None = None,
          source: Callable[[Run], ExperienceSource] | None = None,
          evaluators: Sequence[Callable[[Run], Evaluator]] = (),
          init_params: tuple[ModelConfig, Params] | None = None, init_from: str | None = None,
          workdir: str | None = None, mesh: Mesh | None = None) -> tuple[ModelConfig, Params]:
    """Runs (or resumes, or skips if finished) one training job; returns the final (model config, params).

    objective: a registered name (default `config.objective`) or an `Objective` instance.
    records / eval_records: the training / eval data as an in-memory list of record dicts or the path
        of a records file (`glore_jax.data.store`); default: `config.data.records` or the task split.
    source: builds the experience source from the run (default `Run.offline`: the records, batched).
    evaluators: more eval hooks (e.g. `evals.GenerationEval`) besides the loss on `eval_records`.
    init_params / init_from: start from these params, or from a saved model or earlier workdir
        (default `config.init_from`); ignored when the workdir already has checkpoints.
    """
    exp = _experiment(config, objective if isinstance(objective, str) else None, workdir, init_from)
    obj = objective if isinstance(objective, Objective) else objectives.get(exp.objective, exp)
    os.makedirs(exp.workdir, exist_ok=True)
    # One writer per workdir: a second trainer would interleave metrics and race inside Orbax.
    with files.WorkdirLock(exp.workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train(exp, obj, records, eval_records, source, evaluators, init_params, mesh)


def _train(exp: Experiment, obj: Objective, records, eval_records, source, evaluators, init_params,
           mesh: Mesh | None) -> tuple[ModelConfig, Params]:
    mesh = mesh or sharding.make_mesh(exp.mesh)
    ways = int(mesh.shape["data"] * mesh.shape["fsdp"])
    if exp.train.batch_size % ways:
        raise ConfigError(f"train.batch_size {exp.train.batch_size} does not divide over the mesh: "
                          f"{dict(mesh.shape)} on {mesh.size} devices splits each batch {ways} ways (data x fsdp); "
                          f"use a multiple of {ways} or change mesh.data / mesh.fsdp (on a CPU host, GLORE_JAX_CPU_DEVICES=1 "
                          "keeps XLA's single device)")
    done = _finished(exp)
    if done is not None:
        logging.info("%s already finished %d steps; loading its model instead of training", exp.workdir, done)
        return model_checkpoints.load_model(os.path.join(exp.workdir, MODEL_DIR), mesh)

    d = exp.data
    inputs.build_first_on_process_zero(d, [s for s, given in ((d.split, d.records), (d.eval_split, d.eval_records))
                                           if not given])
    tokenizer = inputs.load_tokenizer(exp.data)
    prompt_format = obj.check_format(exp.data.prompt_format)
    resolve = lambda given, split, path: inputs.resolve_source(  # noqa: E731
        exp.data, prompt_format, given, split, path, seed=exp.seed)
    # A custom source may bring its own experience: then the configured data is only read if passed.
    train_records = resolve(records, exp.data.split, exp.data.records) if source is None or records else None
    if train_records is None and source is None:
        raise ConfigError("no training data: set data.split, data.records or pass records=...")
    tx = state_lib.optimizer(exp.train)
    model, state, data_state = _start(exp, obj, mesh, tokenizer, tx, init_params)
    run = Run(exp=exp, objective=obj, prompt_format=prompt_format, mesh=mesh, tokenizer=tokenizer, model=model,
              records=train_records, eval_records=resolve(eval_records, exp.data.eval_split, exp.data.eval_records))
    experience = (source or obj.experience or Run.offline)(run)
    if data_state is not None:
        experience.restore(data_state)
    hooks = [make(run) for make in ((obj.evaluate or _loss_eval,) + tuple(evaluators))]
    return _loop(run, state, experience, [h for h in hooks if h is not None], tx)


def done_info(workdir: str) -> dict:
    """A finished workdir's `train_done.json` (step, objective, data counts), or {} if unfinished."""
    path = os.path.join(workdir, DONE_FILE)
    return files.read_json_file(path) if os.path.exists(path) else {}


def _finished(exp: Experiment) -> int | None:
    done = done_info(exp.workdir)
    step = done.get("step")
    return step if step is not None and (step >= exp.train.total_steps or done.get("stopped_early")) else None


def _loss_eval(run: Run) -> LossEval | None:
    if run.eval_records is None:
        return None
    batches = inputs.batches(run.eval_records, run.prompt_format, run.tokenizer, run.mesh,
                             run.pipeline(shuffle=False, pack=False))
    eval_step = state_lib.make_eval_step(run.objective, run.model, run.mesh)
    return LossEval(eval_step, [next(batches) for _ in range(run.exp.train.eval_batches)])


def _loop(run: Run, state: state_lib.TrainState, source: ExperienceSource, evaluators: list,
          tx) -> tuple[ModelConfig, Params]:
    """The steps: batch -> jitted update -> log / eval -> checkpoint, each a named call."""
    t = run.exp.train
    shardings = state_lib.state_shardings(run.model, tx, run.mesh, tuple(state.frozen))
    train_step = state_lib.make_train_step(run.objective, run.model, tx, state_lib.schedule(t), run.mesh,
                                           shardings, t.grad_accum)
    rng = jax.random.key(run.exp.seed + 1)  # the sources' stream; step s reads fold_in(rng, s)
    start = int(jax.device_get(state.step))
    # The current state's frozen trees, for a source that reads them: the step donates the state, so
    # earlier arrays are gone.
    frozen = (lambda st: {"frozen": st.frozen}) if getattr(source, "reads_frozen", False) else (lambda st: {})

    def evaluate() -> dict[str, float]:  # reads `state` when called: the loop rebinds it every step
        return {k: v for e in evaluators for k, v in e(state_lib.model_params(state), state.frozen).items()}

    with Session(run, start) as session:
        stop = t.total_steps if not session.stops_at_resume(start, evaluate) else start
        batch = source.next(state.params, start, jax.random.fold_in(rng, start), **frozen(state)) \
            if start < stop else None
        for step in range(start, stop):
            state, metrics = train_step(state, device_arrays(batch))
            source_state = source.state()  # the position after this step's batch
            padded = int(batch["tokens"].size) if "tokens" in batch else 0
            if step + 1 < t.total_steps:  # fetched while the step runs on device
                batch = source.next(state.params, step + 1, jax.random.fold_in(rng, step + 1), **frozen(state))
            session.record(step + 1, jax.device_get(metrics), padded, evaluate=evaluate,
                           source_metrics=getattr(source, "metrics", None))
            session.maybe_checkpoint(step + 1, state, source_state)
            if session.stopped_early:
                break
        stats = getattr(source, "stats", None)
        if stats is not None and getattr(run.records, "skipped", 0):
            stats = {**stats, "skipped_records": run.records.skipped}
        return session.finish(state, stats)
