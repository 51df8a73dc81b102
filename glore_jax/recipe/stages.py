"""The bodies of the pipeline's stages: sample, label, pair, train, infer, evaluate.

Each function takes the shared `Context` plus its inputs and returns plain
records or a JSON-able summary; `glore_jax.pipeline` decides order, skipping
and resuming (see `recipe.workspace`).
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from glore_jax import prompts, trainer
from glore_jax.models import ModelConfig, checkpoints as model_checkpoints
from glore_jax.recipe import inference as inference_lib, refine_data, sorm_labels, value_eval
from glore_jax.recipe.config import GloreConfig
from glore_jax.recipe.inference import InferenceConfig
from glore_jax.recipe.workspace import sharded
from glore_jax.sampling import Generator
from glore_jax.scoring import ValueScorer
from glore_jax.tasks import is_correct
from glore_jax.tokenizer import Tokenizer
from glore_jax.training.config import Experiment
from glore_jax.training.evals import GenerationEval

Model = tuple[ModelConfig, Any]
VAL_ACCURACY = "val_accuracy"   # the eval a stage stops on: greedy accuracy on Context.val


@dataclasses.dataclass
class Context:
    """What every stage reads: the typed knobs, the mesh and tokenizer, the task's records, the stage configs."""

    g: GloreConfig
    seed: int
    task: str
    max_len: int             # data.max_len: the value models' input length
    mesh: Mesh
    tokenizer: Tokenizer
    train: list[dict]        # task records {id, question, answer, gold, meta}
    test: list[dict]
    val: list[dict]          # carved from the train split; never trained on
    stages: dict[str, Experiment]   # each trained stage's config, built from the shared one at the edge
    preset: str = ""
    config_dict: dict = dataclasses.field(default_factory=dict)   # the whole config, for the report
    models: dict[str, Model] = dataclasses.field(default_factory=dict)   # trained this run, or loaded once
    # What the current stage cut to a length limit: its samplers and scorers, and its trainer's data.
    _counted: list = dataclasses.field(default_factory=list)
    _train_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    last_done: dict = dataclasses.field(default_factory=dict)   # the last trained stage's train_done.json

    def take_counts(self) -> dict[str, int]:
        """Totals since the last call (`Workspace.run_table` calls it around each stage)."""
        totals: dict[str, int] = defaultdict(int, self._train_counts)
        for obj in self._counted:
            for key, value in obj.counts().items():
                totals[key] += value
        self._counted, self._train_counts = [], {}
        return dict(totals)

    def load_model(self, name: str, stage_dir: str) -> Model:
        """A training stage's model: the one it trained this run, or its saved final model."""
        if name not in self.models:
            self.models[name] = model_checkpoints.load_model(os.path.join(stage_dir, "model"), self.mesh)
        return self.models[name]

    @property
    def questions(self) -> list[dict]:
        """The train questions the sampling stages use."""
        return self.train[:self.g.train_questions or None]

    def generator(self, model: Model) -> Generator:
        cfg, params = model
        gen = Generator(cfg, params, max_new=self.g.max_new_tokens, mesh=self.mesh, pad_id=self.tokenizer.pad_id,
                        vocab_limit=self.tokenizer.vocab_size, rows=self.g.sample_rows,
                        max_prompt_len=self.g.max_prompt_len, tokenizer=self.tokenizer)
        self._counted.append(gen)
        return gen

    def scorer(self, model: Model) -> ValueScorer:
        cfg, params = model
        scorer = ValueScorer(cfg, params, self.tokenizer, max_len=self.max_len, rows=self.g.sample_rows,
                             mesh=self.mesh)
        self._counted.append(scorer)
        return scorer

    def policy_prompts(self, questions: Sequence[str]) -> list[list[int]]:
        return [prompts.get("policy").prompt(self.tokenizer, {"question": q}) for q in questions]

    def train_model(self, stage: str, workdir: str, *, records: str | Sequence[dict], init: Model | None = None) -> Model:
        """Trains (or resumes, or loads when finished) one stage's model on `records`."""
        exp = self.stages[stage]
        # Greedy accuracy on the validation questions, for a stage told to stop on it (glore.policy_val_target).
        evaluators = [lambda run: GenerationEval(run, self.val, max_new=self.g.max_new_tokens, rows=self.g.sample_rows,
                                                 name=VAL_ACCURACY)] if exp.train.stop_metric == VAL_ACCURACY else []
        model = trainer.train(exp, records=records, init_params=init, workdir=workdir, evaluators=evaluators)
        self.last_done = trainer.done_info(workdir)   # the stage's summary reports its steps and any early stop
        data = self.last_done.get("data", {})
        self._train_counts = {"train_examples": data.get("examples", 0),
                              "train_prompts_cut": data.get("prompt_truncated", 0),
                              "train_targets_cut": data.get("target_truncated", 0)}
        return model


def sample_solutions(ctx: Context, policy: Model, questions: Sequence[dict], k: int, stage_dir: str,
                     label: str, seed: int) -> list[dict]:
    """K sampled solutions per question, graded: records {question, gold, solutions, correct}."""
    gen = ctx.generator(policy)

    def shard(chunk, index):
        outs = gen.complete(ctx.policy_prompts([r["question"] for r in chunk]), k=k,
                            temperature=ctx.g.temperature, seed=seed * 10_007 + index)
        return [{"id": r["id"], "question": r["question"], "gold": r["gold"], "solutions": sols,
                 "correct": [is_correct(s, r["gold"]) for s in sols]} for r, sols in zip(chunk, outs)]
    return sharded(stage_dir, questions, shard, ctx.g.shard_size, label=label)


def expert_iteration_records(ctx: Context, samples: Sequence[dict]) -> tuple[list[dict], int]:
    """The SFT set plus every distinct correct sample (the paper's EI data)."""
    records = [{"question": r["question"], "solution": r["answer"]} for r in ctx.train]
    kept = 0
    for r in samples:
        for sol in sorted({s for s, ok in zip(r["solutions"], r["correct"]) if ok}):
            records.append({"question": r["question"], "solution": sol})
            kept += 1
    return records, kept


def orm_records(samples: Sequence[dict]) -> list[dict]:
    return [{"question": r["question"], "gold": r["gold"], "solution": s, "correct": ok}
            for r in samples for s, ok in zip(r["solutions"], r["correct"])]


def label_by_rollouts(ctx: Context, policy: Model, items: Sequence[tuple[str, str, str]], stage_dir: str,
                      *, balance: bool, seed: int) -> list[dict]:
    """SORM labelling in resumable shards; balancing runs over all shards at the end."""
    gen = ctx.generator(policy)
    tok = ctx.tokenizer
    label_cfg = sorm_labels.LabelConfig(k=ctx.g.sorm_k, check_intermediate=ctx.g.check_intermediate,
                                        check_arithmetic=ctx.g.check_arithmetic, balance=False, seed=seed)

    def shard(chunk, index):
        def rollout_fn(queries, k):
            ids = [p + tok.encode(prefix) for p, (_, prefix) in zip(ctx.policy_prompts([q for q, _ in queries]), queries)]
            return gen.complete(ids, k=k, temperature=ctx.g.temperature, seed=seed * 10_007 + index)
        return [s.to_record() for s in sorm_labels.label_solutions(chunk, rollout_fn, label_cfg)]
    records = sharded(stage_dir, items, shard, max(1, ctx.g.shard_size // 4), label="rollouts")
    labelled = [sorm_labels.LabelledSolution(**r) for r in records]
    if balance:
        sorm_labels.balance(labelled, seed)
    return [s.to_record() for s in labelled]


def refinement_records(ctx: Context, samples: Sequence[dict], labelled: Sequence[dict]) -> tuple[list, list, dict]:
    groups = [(r["question"], r["gold"], r["solutions"]) for r in samples]
    refs = {r["question"]: r["answer"] for r in ctx.train if r.get("answer")} if ctx.g.reference_fallback else None
    global_pairs = refine_data.global_pairs(groups, max_per_question=ctx.g.global_pairs_per_question,
                                            seed=ctx.seed, references=refs, check_arithmetic=ctx.g.check_arithmetic)
    local, skipped = refine_data.local_pairs([sorm_labels.LabelledSolution(**r) for r in labelled],
                                             seed=ctx.seed, references=refs,
                                             from_rollouts=ctx.g.local_pairs_from_rollouts)
    return global_pairs, local, skipped


def refinement_candidates(ctx: Context, models: dict[str, Model], drafts: Sequence[dict], stage_dir: str,
                          replay: Sequence[dict], sorm_threshold: float) -> list[dict]:
    """ORM records for the candidates the rerank reads: global and local refinements of `drafts`, graded.

    drafts: ORM records (policy samples of train questions). The ORM was trained on
    policy samples only, yet it reranks refinements; a local refinement keeps the
    draft's prefix and differs in a few lines, which such an ORM ranks poorly
    (README: candidate AUROC). `replay` (ORM records, as many as the candidates)
    keeps the fine-tuned ORM's scores of drafts, which the gate reads, in place.
    """
    refiners = {k: ctx.generator(models[k]) for k in ("global_refiner", "local_refiner")}
    sorm = ctx.scorer(models["sorm"])

    def shard(chunk, index):
        del index
        out = inference_lib.refine([r["question"] for r in chunk], [r["solution"] for r in chunk],
                                   global_refiner=refiners["global_refiner"], local_refiner=refiners["local_refiner"],
                                   sorm=sorm, sorm_threshold=sorm_threshold)
        return [{"question": r["question"], "gold": r["gold"], "solution": sol, "correct": is_correct(sol, r["gold"]),
                 "source": kind, "draft_correct": r["correct"]}
                for kind in ("global", "local") for r, sol in zip(chunk, out[kind])]
    candidates = sharded(stage_dir, drafts, shard, ctx.g.shard_size, label="refinements")
    return candidates + [{**r, "source": "replay"} for r in replay]


def inference_rows(ctx: Context, models: dict[str, Model], questions: Sequence[dict], seed: int,
                   sorm_threshold: float) -> list[dict]:
    """Every candidate of `inference.generate` for these questions (validation or test)."""
    cfg = InferenceConfig(sorm_threshold=sorm_threshold, best_of=ctx.g.best_of, temperature=ctx.g.temperature)
    return inference_lib.generate([(r["question"], r["gold"]) for r in questions],
                                  policy=ctx.generator(models["policy"]),
                                  global_refiner=ctx.generator(models["global_refiner"]),
                                  local_refiner=ctx.generator(models["local_refiner"]), orm=ctx.scorer(models["orm"]),
                                  sorm=ctx.scorer(models["sorm"]), config=cfg, seed=seed)


def greedy_accuracy(ctx: Context, model: Model, questions: Sequence[dict]) -> float:
    """The policy's greedy accuracy on these questions (Expert Iteration's before/after, on validation)."""
    outs = ctx.generator(model).complete(ctx.policy_prompts([r["question"] for r in questions]))
    return float(np.mean([is_correct(o[0], r["gold"]) for o, r in zip(outs, questions)])) if questions else 0.0


def label_quality(ctx: Context, labelled: Sequence[dict]) -> dict:
    """Rollout labels against exact step truth (synthetic task only), with each check flipped.

    check_on / check_off: the intermediate check on and off, the arithmetic
    check as configured; arithmetic_on / arithmetic_off (whichever the run did
    not use): the other check flipped. Every variant is recomputed from the
    same saved rollouts, before balancing, so they differ only by the check.
    """
    if ctx.task != "synthetic":
        return {}
    by_question = {r["question"]: r for r in ctx.train}
    sols = [sorm_labels.LabelledSolution(**r) for r in labelled]
    truths = [value_eval.synthetic_truth(by_question[s.question], s.solution) for s in sols]
    arith = ctx.g.check_arithmetic
    variants = {"check_on": (True, arith), "check_off": (False, arith),
                f"arithmetic_{'off' if arith else 'on'}": (ctx.g.check_intermediate, not arith)}
    return {name: value_eval.label_quality([sorm_labels.relabel(s, *flags) for s in sols], truths)
            for name, flags in variants.items()}


def value_samples(ctx: Context, policy: Model, questions: Sequence[dict], stage_dir: str, label: str,
                  seed: int) -> tuple[list[tuple[str, str]], list[list[float]], list[int], str]:
    """`glore.value_eval_k` policy samples per question, with per-position truth to score value models on:
    (question, solution) items, truths, each item's question index, and what the truth is."""
    samples = sample_solutions(ctx, policy, questions, ctx.g.value_eval_k, os.path.join(stage_dir, "samples"),
                               label, seed=seed)
    items = [(r["question"], s) for r in samples for s in r["solutions"]]
    if ctx.task == "synthetic":
        by_id = {r["id"]: r for r in questions}
        truths = [value_eval.synthetic_truth(by_id[r["id"]], s) for r in samples for s in r["solutions"]]
        truth_name = "the synthetic step checker (exact first-error ground truth)"
    else:
        labelled = label_by_rollouts(ctx, policy, [(r["question"], r["gold"], s) for r in samples
                                                   for s in r["solutions"]],
                                     os.path.join(stage_dir, "rollouts"), balance=False, seed=seed + 1)
        truths = [r["labels"] for r in labelled]
        truth_name = f"held-out rollout labels (K={ctx.g.sorm_k})"
    return items, truths, [q for q, r in enumerate(samples) for _ in r["solutions"]], truth_name


def locate_thresholds(ctx: Context, models: dict[str, Model], stage_dir: str) -> dict:
    """Each value model's locator threshold ("where": the first step below it), chosen on validation
    questions for where-accuracy (`value_eval.calibrate_locator`); `glore.sorm_threshold` >= 0 fixes both."""
    if ctx.g.sorm_threshold >= 0:
        return {"orm": ctx.g.sorm_threshold, "sorm": ctx.g.sorm_threshold, "calibrated": False}
    items, truths, _, truth_name = value_samples(ctx, models["policy"], ctx.val, stage_dir, "validation samples",
                                                 seed=ctx.seed + 5)
    out: dict[str, Any] = {"calibrated": True, "truth": truth_name, "val_questions": len(ctx.val),
                           "val_where_accuracy": {}}
    for name in ("orm", "sorm"):
        out[name], out["val_where_accuracy"][name] = value_eval.calibrate_locator(
            ctx.scorer(models[name]).step_probs(items), truths)
    return out


def value_evaluation(ctx: Context, models: dict[str, Model], stage_dir: str,
                     thresholds: dict[str, float]) -> tuple[dict, str, dict]:
    """ORM vs SORM step accuracy on policy samples of test (or, glore.value_eval_split=val, validation)
    questions, against ground truth; and the SORM-minus-ORM gaps with bootstrap intervals over questions.
    thresholds: each model's locator threshold (`locate_thresholds`), which where-accuracy reads."""
    split = ctx.val if ctx.g.value_eval_split == "val" else ctx.test[:ctx.g.test_questions or None]
    items, truths, questions, truth_name = value_samples(ctx, models["policy"], split, stage_dir,
                                                         f"{ctx.g.value_eval_split} samples", seed=ctx.seed + 2)
    solutions = [s for _, s in items]
    # Step classification (accuracy, balanced accuracy) at a configured locator threshold, else at 0.5;
    # where-accuracy at each model's own (calibrated) threshold.
    cut = ctx.g.sorm_threshold if ctx.g.sorm_threshold >= 0 else 0.5
    out, probs = {}, {}
    for name in ("orm", "sorm"):
        probs[name] = ctx.scorer(models[name]).step_probs(items)
        out[name] = value_eval.value_accuracy(probs[name], truths, solutions, threshold=cut,
                                              where_threshold=thresholds[name])
    gaps = value_eval.compare(probs["orm"], probs["sorm"], truths, solutions, questions,
                              threshold=thresholds["orm"], threshold_b=thresholds["sorm"], seed=ctx.seed)
    return out, truth_name, gaps


def summarize_samples(samples: Sequence[dict]) -> dict[str, float]:
    flat = [ok for r in samples for ok in r["correct"]]
    per_q = [any(r["correct"]) for r in samples]
    return {"samples": len(flat), "sample_accuracy": float(np.mean(flat)) if flat else 0.0,
            "questions_with_a_correct_sample": float(np.mean(per_q)) if per_q else 0.0}


def label_stats(labelled: Sequence[dict]) -> dict[str, Any]:
    counts: dict[str, int] = defaultdict(int)
    for r in labelled:
        for v in r["labels"]:
            counts[{1.0: "positive", 0.0: "negative"}.get(v, "masked")] += 1
    return dict(counts)
