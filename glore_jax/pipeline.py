"""The whole GLoRe recipe as resumable stages: `python -m glore_jax.pipeline [--config=FILE] [--config.k=v]`.

With no arguments it runs `configs/demo.py`: the `demo` preset, from scratch,
on the synthetic arithmetic task, on CPU. Stages, in order:

  policy            SFT on the train split, less `glore.val_questions` carved out for validation
  ei_<r>_samples    K samples per train question, graded        } Expert Iteration,
  ei_<r>            SFT on the SFT set + distinct correct samples  } r = 1..ei_rounds
  orm_samples       the policy's samples, labelled by final answer
  orm               value model from the policy, `orm` objective
  sorm_labels       K rollouts per step prefix of a subsample across questions -> step labels
  sorm              value model from the policy, `sorm` objective
  refine_data       global pairs (wrong -> right), local pairs ([BAD] -> verified rollout)
  global_refiner    SFT on global pairs
  local_refiner     SFT on local pairs
  calibrate         every candidate on the validation questions -> the ORM gate's threshold
  inference         greedy draft; ORM decides when, SORM where; global + local; ORM rerank (test)
  value_eval        ORM vs SORM against ground truth: AUROC, balanced and where-accuracy
  report            report.json, report.md, plots

Everything goes under `--config.workdir` (`stages/<name>/`). A finished
stage is skipped on re-run; a killed stage resumes (see `recipe.workspace`).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
import os
import platform

from absl import app
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.", lock_config=True)


def run(config) -> dict:
    """Runs (or resumes) every stage; returns the report dict."""
    import jax

    from glore_jax import data, sharding
    from glore_jax.recipe import inference as inference_lib, report as report_lib, sorm_labels, stages as S
    from glore_jax.recipe.workspace import Workspace, log, records_path
    from glore_jax.training import config as train_config, inputs

    if not config.workdir:
        raise ValueError("workdir must be set (e.g. --config.workdir=workdir/demo)")
    if "glore" not in config:
        raise ValueError("this config has no pipeline section (`glore`); build it with recipe.config.add_pipeline")
    g = config.glore
    if not config.data.data_dir:
        # One data dir for every stage: the datasets are built and the
        # tokenizer trained once, and every model reads the same ids.
        config = copy.deepcopy(config)
        config.unlock()
        config.data.data_dir = os.path.join(os.path.abspath(config.workdir), "data")
        config.lock()
    mesh = sharding.make_mesh(train_config.mesh_config(config))
    tokenizer = inputs.load_tokenizer(config)
    train = list(inputs.task_split(config, "train"))
    test = list(inputs.task_split(config, "test"))
    if not 0 <= g.val_questions < len(train):
        raise ValueError(f"glore.val_questions must be in [0, {len(train)}), got {g.val_questions}")
    # Validation is carved from the end of the train split and never trained on: the ORM gate is
    # calibrated there, so no decision about the test questions is ever made by looking at them.
    train, val = train[:len(train) - g.val_questions], train[len(train) - g.val_questions:]
    ctx = S.Context(config=config, mesh=mesh, tokenizer=tokenizer, train=train, test=test, val=val)
    ws = Workspace(config.workdir, total_stages=12 + 2 * g.ei_rounds)
    log(f"task {config.data.task}: {len(train)} train / {len(val)} validation / {len(test)} test; model "
        f"{config.model.preset}; {jax.device_count()} {jax.devices()[0].platform} device(s); workdir {ws.root}")
    questions = train[:g.train_questions or None]
    trained: dict[str, S.Model] = {}

    def train_stage(name, stage, **kw):
        out = {}

        def body(d):
            cfg, _ = trained.setdefault(name, ctx.train_model(stage, d, **kw))
            return {"model": os.path.join(d, "model"), "params_m": cfg.num_params() / 1e6}
        out.update(ws.run(name, body))
        if name not in trained:  # finished earlier: the trainer loads the final model without training
            trained[name] = ctx.train_model(stage, ws.stage_dir(name), **kw)
        return out

    summary: dict = {}
    train_stage("policy", "policy", records=train)
    for r in range(1, g.ei_rounds + 1):
        policy = trained["policy" if r == 1 else f"ei_{r - 1}"]

        def ei_samples(d, policy=policy, r=r):
            samples = S.sample_solutions(ctx, policy, questions, g.ei_k, d, f"EI round {r} samples", seed=100 + r)
            records, kept = S.expert_iteration_records(ctx, samples)
            records_path(d, "sft_records.jsonl", records)
            return {**S.summarize_samples(samples), "kept_correct_distinct": kept,
                    "val_greedy_accuracy": S.greedy_accuracy(ctx, policy, val)}
        summary[f"ei_{r}"] = ws.run(f"ei_{r}_samples", ei_samples)
        # The paper re-fine-tunes from the base model each round (here: a fresh init, or config.init_from).
        init = None if g.ei_from_base else policy
        train_stage(f"ei_{r}", "ei", records=os.path.join(ws.stage_dir(f"ei_{r}_samples"), "sft_records.jsonl"),
                    init=init)
    policy = trained[f"ei_{g.ei_rounds}" if g.ei_rounds else "policy"]

    def orm_samples(d):
        samples = S.sample_solutions(ctx, policy, questions, g.orm_k, d, "ORM samples", seed=200)
        records_path(d, "orm_records.jsonl", S.orm_records(samples))
        return {**S.summarize_samples(samples), "val_greedy_accuracy": S.greedy_accuracy(ctx, policy, val)}
    summary["orm_samples"] = ws.run("orm_samples", orm_samples)
    orm_dir = ws.stage_dir("orm_samples")
    train_stage("orm", "orm", records=os.path.join(orm_dir, "orm_records.jsonl"), init=policy)

    def sorm_label_stage(d):
        samples = sorm_labels.subsample(list(data.store.RecordsFile(os.path.join(orm_dir, "orm_records.jsonl"))),
                                          g.sorm_solutions, seed=config.seed)
        items = [(r["question"], r["gold"], r["solution"]) for r in samples]
        labelled = S.label_by_rollouts(ctx, policy, items, d, balance=g.balance, seed=config.seed)
        records_path(d, "sorm_labels.jsonl", labelled)     # labels with their rollouts, for inspection/reuse
        records_path(d, "sorm_records.jsonl", [{"question": r["question"], "solution": r["solution"],
                                                "step_labels": r["labels"]} for r in labelled])
        return {"solutions": len(labelled), "questions": len({r["question"] for r in samples}),
                "wrong_solutions": sum(not r["correct"] for r in samples), **S.label_stats(labelled),
                "label_quality": S.label_quality(ctx, labelled)}
    summary["sorm_labels"] = ws.run("sorm_labels", sorm_label_stage)
    sorm_dir = ws.stage_dir("sorm_labels")
    train_stage("sorm", "sorm", records=os.path.join(sorm_dir, "sorm_records.jsonl"), init=policy)

    def refine_stage(d):
        groups = _regroup(data.store.RecordsFile(os.path.join(orm_dir, "orm_records.jsonl")))
        labelled = list(data.store.RecordsFile(os.path.join(sorm_dir, "sorm_labels.jsonl")))
        global_pairs, local_pairs, skipped = S.refinement_records(ctx, groups, labelled)
        records_path(d, "global_records.jsonl", global_pairs)
        records_path(d, "local_records.jsonl", local_pairs)
        if not global_pairs or not local_pairs:
            raise RuntimeError(f"no refinement pairs (global {len(global_pairs)}, local {len(local_pairs)}; "
                               f"local skipped: {skipped}): sample more (glore.orm_k, glore.train_questions) "
                               "or enable glore.reference_fallback")
        by_source = {kind: dict(sorted(Counter(p["source"] for p in pairs).items()))
                     for kind, pairs in (("global", global_pairs), ("local", local_pairs))}
        return {"global_pairs": len(global_pairs), "local_pairs": len(local_pairs), "by_source": by_source,
                "local_skipped": skipped}
    summary["refine_data"] = ws.run("refine_data", refine_stage)
    refine_dir = ws.stage_dir("refine_data")
    train_stage("global_refiner", "global_refiner", records=os.path.join(refine_dir, "global_records.jsonl"),
                init=policy)
    train_stage("local_refiner", "local_refiner", records=os.path.join(refine_dir, "local_records.jsonl"),
                init=policy)
    models = {"policy": policy, **{k: trained[k] for k in ("orm", "sorm", "global_refiner", "local_refiner")}}

    def calibrate_stage(d):
        rows = S.inference_rows(ctx, models, val, seed=config.seed + 4)
        S.write_rows(d, rows)
        threshold = inference_lib.calibrate_threshold(rows) if g.orm_threshold < 0 else g.orm_threshold
        return {"orm_threshold": threshold, "val_questions": len(rows),
                "val_results": {k: v for k, v in inference_lib.summarize(rows, threshold).items()
                                if isinstance(v, float)}}
    calibration = summary["calibrate"] = ws.run("calibrate", calibrate_stage)

    def inference_stage(d):
        rows = S.inference_rows(ctx, models, test[:g.test_questions or None], seed=config.seed + 1)
        S.write_rows(d, rows)
        return inference_lib.summarize(rows, calibration["orm_threshold"])
    results = ws.run("inference", inference_stage)

    def value_stage(d):
        evals, truth = S.value_evaluation(ctx, models, d)
        return {"evals": evals, "truth": truth}
    value = ws.run("value_eval", value_stage)

    def report_stage(d):
        del d
        rep = {
            "task": config.data.task, "preset": config.model.preset, "seed": config.seed,
            "num_test": len(test[:g.test_questions or None]),
            "results": {**results,
                        **{f"{m}_{k}": value["evals"][m][k] for m in ("orm", "sorm")
                           for k in ("step_accuracy", "final_accuracy", "step_auroc", "step_balanced_accuracy",
                                     "final_auroc", "where_accuracy")},
                        **_label_results(summary["sorm_labels"], g.check_intermediate),
                        "refine_pairs_by_source": summary["refine_data"]["by_source"]},
            "expert_iteration": _ei_effect(summary, g.ei_rounds),
            "value_eval": value["evals"], "step_truth": value["truth"], "stages": summary,
            "timings": dict(ws.timings), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                    "devices": [str(x) for x in jax.devices()]},
            "config": config.to_dict(),
        }
        md = report_lib.write_report(rep, ws.root)
        print(md, flush=True)
        return {"report": os.path.join(ws.root, "report.json")}
    ws.run("report", report_stage)
    with open(os.path.join(ws.root, "report.json")) as f:
        return json.load(f)


def _label_results(labels_summary: dict, check_intermediate: bool) -> dict:
    """SORM label precision/recall against exact truth, for the check setting the run used."""
    quality = labels_summary.get("label_quality", {}).get(f"check_{'on' if check_intermediate else 'off'}", {})
    return {"sorm_label_precision": quality.get("precision", float("nan")),
            "sorm_label_recall": quality.get("recall", float("nan"))}


def _ei_effect(summary: dict, rounds: int) -> dict:
    """Expert Iteration's effect: validation greedy accuracy and train-question sample accuracy, before/after."""
    if not rounds:
        return {"rounds": 0}
    first, last = summary["ei_1"], summary["orm_samples"]
    return {"rounds": rounds, "val_greedy_before": first["val_greedy_accuracy"],
            "val_greedy_after": last["val_greedy_accuracy"], "sample_accuracy_before": first["sample_accuracy"],
            "sample_accuracy_after": last["sample_accuracy"],
            "distinct_correct_added": sum(summary[f"ei_{r}"]["kept_correct_distinct"] for r in range(1, rounds + 1))}


def _regroup(records) -> list[dict]:
    """ORM records (one per sample) back into {question, gold, solutions} groups."""
    groups: dict[str, dict] = {}
    for r in records:
        grp = groups.setdefault(r["question"], {"question": r["question"], "gold": r["gold"], "solutions": []})
        grp["solutions"].append(r["solution"])
    return list(groups.values())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if os.environ.get("GLORE_DISTRIBUTED") == "1":
        import jax
        jax.distributed.initialize()
    from glore_jax.training.metrics import setup_logging
    setup_logging()
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()  # dataset builds are logged per stage; bars would interleave with them
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
