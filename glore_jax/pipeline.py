"""The whole GLoRe recipe as resumable stages: `python -m glore_jax.pipeline [--config=FILE] [--config.k=v]`.

With no arguments it runs `configs/demo.py`: the `demo` preset, from scratch,
on the synthetic arithmetic task, on CPU. The stages, what each reads and
writes, and the functions that run them are one table, `recipe.table`
(printed by `python -m glore_jax.pipeline --print_table`):

  policy            SFT on the train split, less `glore.val_questions` carved out for validation
  ei_<r>_samples    K samples per train question, graded        } Expert Iteration,
  ei_<r>            SFT on the SFT set + distinct correct samples  } r = 1..ei_rounds
  orm_samples       the policy's samples, labelled by final answer
  orm               value model from the policy, `orm` objective
  sorm_labels       K rollouts per step prefix of a subsample across questions -> step labels
  sorm              value model from the policy, `sorm` objective
  locate            each value model's locator threshold ("where"), chosen on validation for where-accuracy
  refine_data       global pairs (wrong -> right), local pairs ([BAD] -> verified rollout)
  global_refiner    SFT on global pairs
  local_refiner     SFT on local pairs
  refiner           with glore.joint_refiner (the demo), one model on both pair sets instead of the two above
  rerank_data       with glore.rerank_orm: global and local refinements of ORM samples, graded
  rerank_orm        the ORM fine-tuned on those; the gate and the rerank then read it
  calibrate         every candidate on the validation questions -> the ORM gate's threshold
  inference         greedy draft; ORM decides when, SORM where; global + local; ORM rerank (test)
  value_eval        ORM vs SORM against ground truth: AUROC, balanced and where-accuracy
  report            report.json, report.md, plots

Everything goes under `--config.workdir` (`stages/<name>/`). A finished
stage is skipped on re-run; a killed stage resumes (see `recipe.workspace`).
"""

from __future__ import annotations

import contextlib
import copy
import os

from absl import app, flags
from ml_collections import config_flags

from glore_jax import cli, files
from glore_jax.errors import ConfigError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.", lock_config=True)
_PRINT_TABLE = flags.DEFINE_bool("print_table", False, "Print the stage table (markdown) for this config and exit.")


def run(config) -> dict:
    """Runs (or resumes) every stage, or those up to `glore.stop_after`; returns the report dict ({} if stopped early)."""
    from glore_jax import compile_cache

    if not config.workdir:
        raise ConfigError("workdir must be set (e.g. --config.workdir=workdir/demo)")
    if "glore" not in config:
        raise ConfigError("this config has no pipeline section (`glore`); build it with recipe.config.add_pipeline")
    cache = compile_cache.workdir_cache(config.workdir, config.glore.compile_cache)
    with compile_cache.persistent(cache) if cache else contextlib.nullcontext():
        return _run(config)


def _run(config) -> dict:
    import jax

    from glore_jax import sharding
    from glore_jax.recipe import stages as S
    from glore_jax.recipe.config import TRAINED_STAGES, GloreConfig, stage_config
    from glore_jax.recipe.table import stage_table
    from glore_jax.recipe.workspace import Workspace, log
    from glore_jax.training import config as train_config, inputs

    config = copy.deepcopy(config)
    config.unlock()
    # One data dir for every stage: the datasets are built and the tokenizer
    # trained once, and every model reads the same ids.
    config.data.data_dir = config.data.data_dir or os.path.join(os.path.abspath(config.workdir), "data")
    # "auto" is resolved once per workdir and recorded, so a resumed run never switches dtype midway.
    config.model.dtype = _pin_hardware(config.workdir, config.model.dtype)
    config.lock()
    exp, g = train_config.experiment(config), GloreConfig.from_config(config.glore)
    mesh = sharding.make_mesh(exp.mesh)
    inputs.build_first_on_process_zero(exp.data, ("train", "test"))
    tokenizer = inputs.load_tokenizer(exp.data)
    train = list(inputs.task_split(exp.data, "train"))
    test = list(inputs.task_split(exp.data, "test"))
    if not 0 <= g.val_questions < len(train):
        raise ConfigError(f"glore.val_questions must be in [0, {len(train)}), got {g.val_questions}")
    # Validation is carved from the end of the train split and never trained on: the ORM gate is
    # calibrated there, so no decision about the test questions is ever made by looking at them.
    train, val = train[:len(train) - g.val_questions], train[len(train) - g.val_questions:]
    ctx = S.Context(g=g, seed=exp.seed, task=exp.data.task, max_len=exp.data.max_len, mesh=mesh, tokenizer=tokenizer,
                    train=train, test=test, val=val, stages={name: _stage_experiment(config, name, stage_config)
                                                             for name in TRAINED_STAGES},
                    preset=config.model.preset, config_dict=config.to_dict())
    table, aliases = stage_table(g)
    ws = Workspace(config.workdir, total_stages=len(table))
    log(f"task {exp.data.task}: {len(train)} train / {len(val)} validation / {len(test)} test; model "
        f"{config.model.preset}; {jax.device_count()} {jax.devices()[0].platform} device(s); workdir {ws.root}")
    # One pipeline per workdir; each trainer also locks its own stage directory.
    if g.stop_after and g.stop_after not in {s.name for s in table}:
        raise ConfigError(f"glore.stop_after={g.stop_after!r} is not a stage; stages: {[s.name for s in table]}")
    with files.WorkdirLock(ws.root) if jax.process_index() == 0 else contextlib.nullcontext():
        results = ws.run_table(table, ctx.load_model, ctx, aliases, counts=ctx.take_counts, stop_after=g.stop_after)
    if "report" not in results:
        return {}
    return files.read_json_file(os.path.join(ws.root, "report.json"))


def _pin_hardware(workdir: str, dtype: str | None) -> str | None:
    """`dtype`, with "auto" resolved once per workdir: `hardware.json` records what "auto" chose, and the
    XLA device count, on the machine the workdir started on. A resumed run keeps the dtype, and is warned
    when its device count differs: a mesh over other devices reduces in another order, so from there on
    its numbers are not the uninterrupted run's."""
    import jax

    from glore_jax import distributed, hardware
    from glore_jax.recipe.workspace import log
    path = os.path.join(os.path.abspath(workdir), "hardware.json")
    if not distributed.agree(os.path.exists(path)):  # measured once, by process 0, for every process
        os.makedirs(os.path.dirname(path), exist_ok=True)
        distributed.write_once(path, lambda: files.write_json(
            path, {"dtype": hardware.fastest_dtype(), "cpu_bf16_flags": hardware.cpu_bf16_flags(),
                   "devices": jax.device_count()}))
    pinned = files.read_json_file(path)
    started = pinned.get("devices", jax.device_count())  # workdirs from before the count was recorded: unknown
    if started != jax.device_count():
        log(f"WARNING this workdir started on {started} XLA device(s) and resumes on {jax.device_count()}: its "
            f"numbers will differ from an uninterrupted run's (GLORE_JAX_CPU_DEVICES={started} resumes it as "
            "it began on a CPU host)")
    return pinned["dtype"] if dtype == "auto" else dtype


def _stage_experiment(config, stage: str, stage_config):
    from glore_jax.training import config as train_config
    from glore_jax.recipe.stages import VAL_ACCURACY
    c = stage_config(config, stage)
    c.unlock()
    c.data.eval_split = ""   # every stage trains on records the pipeline made; it evaluates its models itself
    if stage == ("ei" if config.glore.ei_rounds else "policy") and config.glore.policy_val_target > 0:
        # The policy's competence, not its step count, is what the recipe needs to match (the paper refines
        # a ~53% policy): the stage that makes the final policy stops once it is there, judged on the
        # validation questions, never on test. A seed whose init learns fast then stops early.
        c.train.eval_every, c.train.stop_metric = config.glore.policy_eval_every, VAL_ACCURACY
        c.train.stop_at = config.glore.policy_val_target
    c.lock()
    return train_config.experiment(c)


def table_markdown(config) -> str:
    """The stage table as the README shows it: stage, what it reads and writes, what it does."""
    from glore_jax.recipe.config import GloreConfig
    from glore_jax.recipe.table import stage_table
    table, aliases = stage_table(GloreConfig.from_config(config.glore))
    lines = ["| stage | reads | writes | does |", "| --- | --- | --- | --- |"]
    for s in table:
        reads = ", ".join(sorted({r.removesuffix(".summary") + (" (summary)" if r.endswith(".summary") else "")
                                  for r in s.reads})) if s.name != "report" else "every stage's summary"
        writes = ", ".join(w if w.endswith(".jsonl") else f"{w} (model)" for w in s.writes)
        lines.append(f"| {s.name} | {reads} | {writes} | {s.does} |")
    lines.append("")
    what = "the policy after Expert Iteration" + (" and GRPO" if aliases.get("policy_final") == "rl" else "")
    roles = {"policy_final": what, "orm_final": "the ORM the gate and the rerank read",
             "global_refiner": "one refiner for both", "local_refiner": "one refiner for both"}
    lines.append("; ".join(f"`{k}` is `{v}` ({roles[k]})" for k, v in aliases.items()) + ".")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _PRINT_TABLE.value:
        print(table_markdown(_CONFIG.value))
        return
    from glore_jax import distributed
    distributed.initialize_from_env()
    from glore_jax.training.metrics import setup_logging
    setup_logging()
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()  # dataset builds are logged per stage; bars would interleave with them
    run(_CONFIG.value)


if __name__ == "__main__":
    cli.main(main)
