"""The GLoRe recipe as a table of stages: what each reads, what it writes, and the function that runs it.

Artefacts are named, and the workspace resolves a name to the stage that
writes it (`recipe.workspace.Workspace.run_table`):
  `x.jsonl`      a records file in the writing stage's directory;
  `x.summary`    the JSON summary stage `x` returned (its `done.json`);
  a stage name   the model a training stage trained (loaded when first read).
A stage function gets the shared `Context` and a `StageIO` (its directory and
its resolved inputs) and returns its JSON summary.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
from collections import Counter
from collections.abc import Callable

from glore_jax.data.store import RecordsFile
from glore_jax.recipe import inference as inference_lib, report as report_lib, sorm_labels, stages as S
from glore_jax.recipe.config import SORM_INITS, GloreConfig
from glore_jax.recipe.workspace import StageIO, records_path, truncation_warnings


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    name: str
    does: str                                        # one line, for the README's table
    run: Callable[[S.Context, StageIO], dict]
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


def _train(name: str, key: str, does: str, records: str | None, init: str | None) -> Stage:
    """A training stage: its model is the artefact named like the stage."""
    def run(ctx: S.Context, io: StageIO) -> dict:
        cfg, params = ctx.models[name] = ctx.train_model(key, io.dir, records=io[records] if records else ctx.train,
                                                         init=io[init] if init else None)
        done = ctx.last_done
        return {"model": os.path.join(io.dir, "model"), "params_m": cfg.num_params() / 1e6, "steps": done.get("step"),
                **({"stopped_early": done["stopped_early"]} if done.get("stopped_early") else {})}
    return Stage(name=name, does=does, run=run, reads=tuple(x for x in (records, init) if x), writes=(name,))


def _ei_samples(r: int, policy: str) -> Stage:
    def run(ctx: S.Context, io: StageIO) -> dict:
        samples = S.sample_solutions(ctx, io[policy], ctx.questions, ctx.g.ei_k, io.dir, f"EI round {r} samples",
                                     seed=100 + r)
        records, kept = S.expert_iteration_records(ctx, samples)
        records_path(io.dir, f"ei_{r}_records.jsonl", records)
        return {**S.summarize_samples(samples), "kept_correct_distinct": kept,
                "val_greedy_accuracy": S.greedy_accuracy(ctx, io[policy], ctx.val)}
    return Stage(name=f"ei_{r}_samples", does="K samples per train question, graded; SFT set + distinct correct",
                 run=run, reads=(policy,), writes=(f"ei_{r}_records.jsonl",))


def _orm_samples(ctx: S.Context, io: StageIO) -> dict:
    samples = S.sample_solutions(ctx, io["policy_final"], ctx.questions, ctx.g.orm_k, io.dir, "ORM samples", seed=200)
    records_path(io.dir, "orm_records.jsonl", S.orm_records(samples))
    return {**S.summarize_samples(samples), "val_greedy_accuracy": S.greedy_accuracy(ctx, io["policy_final"], ctx.val)}


def _sorm_labels(ctx: S.Context, io: StageIO) -> dict:
    samples = sorm_labels.subsample(list(RecordsFile(io["orm_records.jsonl"])), ctx.g.sorm_solutions, seed=ctx.seed,
                                    wrong_share=ctx.g.sorm_wrong_share)
    items = [(r["question"], r["gold"], r["solution"]) for r in samples]
    labelled = S.label_by_rollouts(ctx, io["policy_final"], items, io.dir, balance=ctx.g.balance, seed=ctx.seed)
    records_path(io.dir, "sorm_labels.jsonl", labelled)     # labels with their rollouts, for inspection/reuse
    records_path(io.dir, "sorm_records.jsonl", [{"question": r["question"], "solution": r["solution"],
                                                 "step_labels": r["labels"]} for r in labelled])
    return {"solutions": len(labelled), "questions": len({r["question"] for r in samples}),
            "wrong_solutions": sum(not r["correct"] for r in samples), **S.label_stats(labelled),
            "label_quality": S.label_quality(ctx, labelled)}


def _refine_data(ctx: S.Context, io: StageIO) -> dict:
    groups: dict[str, dict] = {}  # ORM records (one per sample) back into per-question groups
    for r in RecordsFile(io["orm_records.jsonl"]):
        groups.setdefault(r["question"], {"question": r["question"], "gold": r["gold"], "solutions": []})
        groups[r["question"]]["solutions"].append(r["solution"])
    global_pairs, local_pairs, skipped = S.refinement_records(ctx, list(groups.values()),
                                                              list(RecordsFile(io["sorm_labels.jsonl"])))
    records_path(io.dir, "global_records.jsonl", global_pairs)
    records_path(io.dir, "local_records.jsonl", local_pairs)
    if ctx.g.joint_refiner:
        records_path(io.dir, "refiner_records.jsonl", global_pairs + local_pairs)
    if not global_pairs or not local_pairs:
        raise RuntimeError(f"no refinement pairs (global {len(global_pairs)}, local {len(local_pairs)}; "
                           f"local skipped: {skipped}): sample more (glore.orm_k, glore.train_questions) "
                           "or enable glore.reference_fallback")
    by_source = {kind: dict(sorted(Counter(p["source"] for p in pairs).items()))
                 for kind, pairs in (("global", global_pairs), ("local", local_pairs))}
    return {"global_pairs": len(global_pairs), "local_pairs": len(local_pairs), "by_source": by_source,
            "local_skipped": skipped}


def _rerank_data(ctx: S.Context, io: StageIO) -> dict:
    orm_records = list(RecordsFile(io["orm_records.jsonl"]))
    drafts = sorm_labels.subsample(orm_records, ctx.g.rerank_drafts, seed=ctx.seed + 7)
    replay = random.Random(ctx.seed + 8).sample(orm_records, min(len(orm_records), 2 * len(drafts)))
    records = S.refinement_candidates(ctx, _models(io, ("global_refiner", "local_refiner", "sorm")), drafts, io.dir,
                                      replay, sorm_threshold=io["locate.summary"]["sorm"])
    records_path(io.dir, "rerank_records.jsonl", records)
    counts = {kind: {"candidates": sum(r["source"] == kind for r in records),
                     "correct": sum(r["correct"] for r in records if r["source"] == kind)}
              for kind in ("global", "local", "replay")}
    return {"drafts": len(drafts), "wrong_drafts": sum(not r["correct"] for r in drafts), "by_source": counts}


MODELS = ("policy_final", "orm_final", "sorm", "global_refiner", "local_refiner")
VALUE_EVAL_MODELS = ("policy_final", "orm", "sorm")


def _models(io: StageIO, names: tuple[str, ...] = MODELS) -> dict:
    """Stage artefacts by the role inference reads them in (the final policy is `policy`, the final ORM `orm`)."""
    return {{"policy_final": "policy", "orm_final": "orm"}.get(m, m): io[m] for m in names}


def _locate(ctx: S.Context, io: StageIO) -> dict:
    return S.locate_thresholds(ctx, _models(io, VALUE_EVAL_MODELS), io.dir)


def _calibrate(ctx: S.Context, io: StageIO) -> dict:
    rows = S.inference_rows(ctx, _models(io), ctx.val, seed=ctx.seed + 4, sorm_threshold=io["locate.summary"]["sorm"])
    records_path(io.dir, "val_rows.jsonl", rows)
    g = ctx.g
    threshold = inference_lib.calibrate_threshold(rows) if g.orm_threshold < 0 else g.orm_threshold
    chosen = inference_lib.calibrate_refiners(rows)
    return {"orm_threshold": threshold, "val_questions": len(rows), "refiner_set": list(chosen),
            "val_results": {k: v for k, v in inference_lib.summarize(rows, threshold, chosen).items()
                            if isinstance(v, float)}}


def _inference(ctx: S.Context, io: StageIO) -> dict:
    rows = S.inference_rows(ctx, _models(io), ctx.test[:ctx.g.test_questions or None], seed=ctx.seed + 1,
                            sorm_threshold=io["locate.summary"]["sorm"])
    records_path(io.dir, "test_rows.jsonl", rows)
    cal = io["calibrate.summary"]
    chosen = tuple(cal["refiner_set"]) if "refiner_set" in cal else None  # absent in older workdirs
    return inference_lib.summarize(rows, cal["orm_threshold"], chosen)


def _value_eval(ctx: S.Context, io: StageIO) -> dict:
    evals, truth, gaps = S.value_evaluation(ctx, _models(io, VALUE_EVAL_MODELS), io.dir, io["locate.summary"])
    return {"evals": evals, "truth": truth, "sorm_minus_orm": gaps}


def _report(ctx: S.Context, io: StageIO) -> dict:
    import jax
    g, summary = ctx.g, {k.removesuffix(".summary"): io[k] for k in io.reads}
    value = summary["value_eval"]
    rep = {
        "task": ctx.task, "preset": ctx.preset, "seed": ctx.seed, "num_test": len(ctx.test[:g.test_questions or None]),
        "results": {**summary["inference"],
                    **{f"{m}_{k}": value["evals"][m][k] for m in ("orm", "sorm")
                       for k in ("step_accuracy", "final_accuracy", "step_auroc", "step_balanced_accuracy",
                                 "final_auroc", "where_accuracy", "where_threshold", "where_accuracy_at_half")},
                    **_label_results(summary["sorm_labels"], g.check_intermediate),
                    **{f"sorm_minus_orm_{k}": v for k, v in value.get("sorm_minus_orm", {}).items()},
                    "refine_pairs_by_source": summary["refine_data"]["by_source"]},
        # The steps each policy stage trained, and where one stopped on glore.policy_val_target.
        "policy_training": {k: {"steps": summary[k].get("steps"), "stopped_early": summary[k].get("stopped_early")}
                            for k in _policy_stages(g)},
        "expert_iteration": _ei_effect(summary, g.ei_rounds),
        "value_eval": value["evals"], "step_truth": value["truth"], "value_eval_split": g.value_eval_split,
        "stages": {k.removesuffix("_samples") if k.startswith("ei_") else k: v for k, v in summary.items()
                   if (k.startswith("ei_") and k.endswith("_samples"))
                   or k in ("orm_samples", "sorm_labels", "refine_data", "locate", "calibrate")},
        "truncation": {"per_stage": {k: v for k, v in io.truncation.items() if v},
                       "warnings": [f"{stage}: {w}" for stage, counts in io.truncation.items()
                                    for w in truncation_warnings(counts)]},
        "timings": dict(io.timings), "compile_timings": dict(io.compile_timings),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "devices": [str(x) for x in jax.devices()],
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES")},
        "config": ctx.config_dict,
    }
    root = os.path.dirname(os.path.dirname(io.dir))
    print(report_lib.write_report(rep, root), flush=True)
    return {"report": os.path.join(root, "report.json")}


def _label_results(labels_summary: dict, check_intermediate: bool) -> dict:
    """SORM label precision/recall against exact truth, for the check setting the run used."""
    quality = labels_summary.get("label_quality", {}).get(f"check_{'on' if check_intermediate else 'off'}", {})
    return {"sorm_label_precision": quality.get("precision", float("nan")),
            "sorm_label_recall": quality.get("recall", float("nan"))}


def _policy_stages(g: GloreConfig) -> list[str]:
    return ["policy"] + [f"ei_{r}" for r in range(1, g.ei_rounds + 1)]


def _ei_effect(summary: dict, rounds: int) -> dict:
    """Expert Iteration's effect: validation greedy accuracy and train-question sample accuracy, before/after."""
    if not rounds:
        return {"rounds": 0}
    first, last = summary["ei_1_samples"], summary["orm_samples"]
    return {"rounds": rounds, "val_greedy_before": first["val_greedy_accuracy"],
            "val_greedy_after": last["val_greedy_accuracy"], "sample_accuracy_before": first["sample_accuracy"],
            "sample_accuracy_after": last["sample_accuracy"],
            "distinct_correct_added": sum(summary[f"ei_{r}_samples"]["kept_correct_distinct"]
                                          for r in range(1, rounds + 1))}


def stage_table(g: GloreConfig) -> tuple[list[Stage], dict[str, str]]:
    """The recipe, in order, and the aliases it reads through: `policy_final` is the last EI round's policy
    (or, with `glore.rl_stage`, that policy after GRPO)."""
    table = [_train("policy", "policy", "SFT on the train split, less the validation questions", None, None)]
    for r in range(1, g.ei_rounds + 1):
        previous = "policy" if r == 1 else f"ei_{r - 1}"
        table += [_ei_samples(r, previous),
                  # The paper re-fine-tunes from the base model each round (here: a fresh init or init_from).
                  _train(f"ei_{r}", "ei", "SFT on the SFT set plus the round's distinct correct samples",
                         f"ei_{r}_records.jsonl", None if g.ei_from_base else previous)]
    final = f"ei_{g.ei_rounds}" if g.ei_rounds else "policy"
    if g.rl_stage:
        table.append(_train("rl", "rl", "GRPO (rl.*) from the EI policy on the train questions", None, final))
        final = "rl"
    aliases = {"policy_final": final, "orm_final": "rerank_orm" if g.rerank_orm else "orm"}
    table += [
        Stage(name="orm_samples", does="the final policy's samples, labelled by final answer", run=_orm_samples,
              reads=("policy_final",), writes=("orm_records.jsonl",)),
        _train("orm", "orm", "value model from the policy, ORM labels", "orm_records.jsonl", "policy_final"),
        Stage(name="sorm_labels", does="K rollouts per step prefix of a subsample across questions -> step labels",
              run=_sorm_labels, reads=("orm_records.jsonl", "policy_final"),
              writes=("sorm_labels.jsonl", "sorm_records.jsonl")),
        # glore.sorm_init="orm" warm-starts it from the ORM: the demo labels 768 solutions, a tenth of the ORM's data.
        _train("sorm", "sorm", f"value model from the {g.sorm_init}, SORM step labels", "sorm_records.jsonl",
               SORM_INITS[g.sorm_init]),
        Stage(name="locate", does="each value model's locator threshold, chosen on validation for where-accuracy "
              "(glore.sorm_threshold < 0)", run=_locate, reads=VALUE_EVAL_MODELS),
        Stage(name="refine_data", does="global pairs (wrong -> right) and local pairs ([BAD] -> verified rollout)",
              run=_refine_data, reads=("orm_records.jsonl", "sorm_labels.jsonl"),
              writes=("global_records.jsonl", "local_records.jsonl")
              + (("refiner_records.jsonl",) if g.joint_refiner else ())),
    ]
    if g.joint_refiner:
        table.append(_train("refiner", "refiner", "SFT on global and local pairs: one model refines both ways",
                            "refiner_records.jsonl", "policy_final"))
        aliases.update(global_refiner="refiner", local_refiner="refiner")
    else:
        table += [_train("global_refiner", "global_refiner", "SFT on global pairs", "global_records.jsonl",
                         "policy_final"),
                  _train("local_refiner", "local_refiner", "SFT on local pairs", "local_records.jsonl", "policy_final")]
    if g.rerank_orm:
        table += [
            Stage(name="rerank_data", does="global and local refinements of ORM samples, graded, plus replayed "
                  "ORM records", run=_rerank_data,
                  reads=("orm_records.jsonl", "global_refiner", "local_refiner", "sorm", "locate.summary"),
                  writes=("rerank_records.jsonl",)),
            _train("rerank_orm", "rerank_orm", "the ORM fine-tuned on those: the gate and rerank read it",
                   "rerank_records.jsonl", "orm")]
    table += [
        Stage(name="calibrate", does="every candidate on the validation questions -> the ORM gate's threshold, "
              "and which refiners the rerank reads (`refiner_set`)",
              run=_calibrate, reads=MODELS + ("locate.summary",), writes=("val_rows.jsonl",)),
        Stage(name="inference", does="greedy draft; ORM decides when, SORM where; global + local; ORM rerank",
              run=_inference, reads=MODELS + ("locate.summary", "calibrate.summary"), writes=("test_rows.jsonl",)),
        Stage(name="value_eval", does="ORM vs SORM against ground truth: AUROC, balanced and where-accuracy",
              run=_value_eval, reads=VALUE_EVAL_MODELS + ("locate.summary",)),
        Stage(name="report", does="report.json, report.md, plots", run=_report,
              reads=tuple(f"{s.name}.summary" for s in table if s.name.startswith("ei_") and s.name.endswith("samples"))
              + tuple(f"{s}.summary" for s in _policy_stages(g))
              + ("orm_samples.summary", "sorm_labels.summary", "refine_data.summary", "locate.summary",
                 "calibrate.summary", "inference.summary", "value_eval.summary")),
    ]
    return table, aliases
