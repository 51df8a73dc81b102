"""SCoRe end to end: stage I, stage II and the single-stage ablation, then a held-out two-turn report.

    python -m glore_jax.rl.score_recipe --config=configs/score_demo.py [--config.workdir=... --config.seed=1]
    python -m glore_jax.rl.score_recipe --summarize=workdir/score_s0,workdir/score_s1 [--out=table.md]

The config is an ordinary `score` training config plus `score_recipe.*`
(steps per stage, whether to run the ablation, test questions). From it
`run_configs` derives one training config per run, each in its own
`<workdir>/<run>` (each resumes or skips on rerun, like any `train` job):

    warmup   SFT in the `self_correct` format on the policy's own samples (see below), warmup_steps
    stage1   score.stage=1 from the warmed-up policy (the base), stage1_steps
    stage2   score.stage=2 from stage1's model, KL still to the base, stage2_steps
    single   score.stage=2 with score.alpha=0 from the base, stage1_steps + stage2_steps:
             plain two-turn RL with the same sample budget, the ablation that should collapse

Why a warm-up. SCoRe starts from an instruction-tuned model that already
answers a second turn about as well as the first (the paper's base: 52.6%
-> 41.4% on MATH). The demo policy was trained on single-turn sequences of
at most `data.max_len` tokens, so its second attempt sits at positions it
never saw and it answers 6% at turn 2 against 52% at turn 1; stage I then
barely moved (3% -> 9% in 25 steps) while turn 1 fell. The warm-up teaches
only the format, by self-distillation: for each of `warmup_questions` train
questions, the policy's own greedy solution is the target of two examples,
one at turn 1 (no draft) and one at turn 2 after a draft sampled from the
policy at `rl.temperature`, unfiltered. The target does not depend on
whether the draft is right, so nothing is learned about correcting: the
second turn learns to answer as the first would. What failed first: draft
and target two temperature samples, turn 2 only (turn-1 greedy accuracy
fell from 52% to 11% on 64 test questions), and greedy targets, turn 2
only (14%): in this ~1M-parameter model, learning the second turn alone
overwrote the first; the turn-1 examples hold it in place.
`warmup_steps=0` starts SCoRe from `init_from` itself.

Then every model (the demo policy, base, single, stage1, stage2) answers each test question
twice, greedily (`two_turn.greedy_two_turn`), and `<workdir>/report.{json,md}`
gives Acc@t1, Acc@t2, the deltas and the identical-second-turn share, with
95% Wilson intervals and exact McNemar tests on the same questions.
"""

from __future__ import annotations

import copy
import json
import os

from ml_collections import ConfigDict

from glore_jax import cli, files
from glore_jax.errors import ConfigError

RUNS = ("warmup", "stage1", "stage2", "single")
ROWS = {"init": "demo policy, prompted to self-correct (no warm-up)",
        "warmup": "base: demo policy + two-turn format warm-up", "single": "single-stage two-turn RL (alpha = 0)",
        "stage1": "SCoRe stage I only", "stage2": "SCoRe stage I + II"}
WARMUP_RECORDS = "warmup_records.jsonl"


def recipe_knobs() -> ConfigDict:
    r = ConfigDict()
    r.warmup_steps = 150       # SFT steps of the format warm-up (0 = none: SCoRe starts from init_from)
    r.warmup_learning_rate = 3e-4
    r.warmup_questions = 2048  # train questions, two policy samples each
    r.stage1_steps = 80
    r.stage2_steps = 160
    r.ablation = True          # also train `single` (alpha = 0, no stage I)
    r.test_questions = 0       # 0 = the whole test split
    return r


def run_configs(config: ConfigDict) -> dict[str, ConfigDict]:
    """The training config of each run (stage1, stage2 and, with score_recipe.ablation, single)."""
    if "score_recipe" not in config:
        raise ConfigError("this command needs score_recipe.* knobs: start the config from configs/score_demo.py")
    if not config.init_from:
        raise ConfigError("init_from must name the base policy SCoRe starts from (a saved model or workdir)")
    from glore_jax.rl.config import ScoreConfig
    ScoreConfig(**config.score.to_dict()).check()  # before any sampling: a bad knob fails in one line
    r = config.score_recipe
    for key in ("warmup_steps", "stage1_steps", "stage2_steps", "warmup_questions", "test_questions"):
        if r[key] < 0:
            raise ConfigError(f"score_recipe.{key} must be >= 0, got {r[key]}")
    if r.stage1_steps == 0 or r.stage2_steps == 0:
        raise ConfigError("score_recipe.stage1_steps and stage2_steps must be positive")
    base = os.path.join(config.workdir, "warmup") if r.warmup_steps else config.init_from
    plan = {"stage1": (1, config.score.alpha, base, r.stage1_steps),
            "stage2": (2, config.score.alpha, os.path.join(config.workdir, "stage1"), r.stage2_steps)}
    if r.ablation:
        plan["single"] = (2, 0.0, base, r.stage1_steps + r.stage2_steps)
    out = {}
    if r.warmup_steps:
        c = copy.deepcopy(config)
        c.unlock()
        c.objective, c.workdir, c.data.prompt_format, c.data.eval_split = "sft", base, "self_correct", ""
        c.train.total_steps, c.train.learning_rate, c.train.batch_size = r.warmup_steps, r.warmup_learning_rate, 32
        c.data.max_len = episode_width(config)
        c.lock()
        out["warmup"] = c
    for name, (stage, alpha, init_from, steps) in plan.items():
        c = copy.deepcopy(config)
        c.unlock()
        c.objective, c.workdir, c.init_from = "score", os.path.join(config.workdir, name), init_from
        c.score.stage, c.score.alpha, c.train.total_steps = stage, alpha, steps
        c.score.reference = config.score.reference or base  # every run's KL is to the base policy
        c.lock()
        out[name] = c
    return out


def episode_width(config: ConfigDict) -> int:
    """Tokens of a two-turn episode: both prompts' and attempts' limits plus the instruction."""
    from glore_jax.prompts import SELF_CORRECT_INSTRUCTION
    rl = config.rl
    # <eos> + instruction + <SOL>; the instruction's length is bounded by its characters (>= 1 per token)
    return rl.max_prompt_len + 2 * rl.max_new_tokens + len(SELF_CORRECT_INSTRUCTION) + 2


def warmup_records(config: ConfigDict, path: str) -> list[dict]:
    """Per question, the policy's greedy solution as the target of a turn-1 record (no draft) and of a turn-2
    record whose draft is a policy sample at rl.temperature; unfiltered.

    Written once to `path` (atomically); a rerun reads them back, so a crash after sampling loses nothing.
    """
    from glore_jax import sharding
    from glore_jax.data.store import RecordsFile, write_records
    from glore_jax.prompts import fit_prompt, get
    from glore_jax.sampling import Generator
    from glore_jax.training import config as train_config, inputs
    from glore_jax.training.checkpoints import load_init
    if os.path.exists(path):
        return list(RecordsFile(path))
    exp = train_config.experiment(config)
    mesh = sharding.make_mesh(exp.mesh)
    tok = inputs.load_tokenizer(exp.data)
    questions = list(inputs.task_split(exp.data, exp.data.split))[:config.score_recipe.warmup_questions]
    model, params = load_init(config.init_from, mesh)
    gen = Generator(model, params, max_new=exp.rl.max_new_tokens, mesh=mesh, pad_id=tok.pad_id,
                    vocab_limit=tok.vocab_size, rows=64, max_prompt_len=exp.rl.max_prompt_len, tokenizer=tok)
    ids = [fit_prompt(get("policy").prompt(tok, q), exp.rl.max_prompt_len)[0] for q in questions]
    drafts = gen.complete(ids, temperature=exp.rl.temperature, seed=config.seed)
    targets = gen.complete(ids)
    records = []
    for i, (q, a, b) in enumerate(zip(questions, drafts, targets)):
        common = {"question": q["question"], "gold": q["gold"], "target": b[0]}
        records += [{"id": f"{i}-t1", **common}, {"id": f"{i}-t2", "draft": a[0], **common}]
    write_records(path, records)
    return records


def row(outcomes: list[dict]) -> dict:
    from glore_jax.recipe import stats
    from glore_jax.rl.score import self_correction_metrics
    c1, c2 = [o["correct_t1"] for o in outcomes], [o["correct_t2"] for o in outcomes]
    n = len(outcomes)
    out = self_correction_metrics(c1, c2)
    out.update(n=n, identical=sum(o["identical"] for o in outcomes) / n,
               ci95_t1=stats.wilson_interval(sum(c1), n), ci95_t2=stats.wilson_interval(sum(c2), n),
               p_t2_vs_t1=stats.mcnemar_exact(c1, c2))
    return out


def report(config: ConfigDict, timings: dict[str, float]) -> dict:
    from glore_jax import sharding, trainer
    from glore_jax.recipe import stats
    from glore_jax.rl.two_turn import greedy_two_turn
    from glore_jax.training import config as train_config, inputs
    from glore_jax.training.checkpoints import load_init
    exp = train_config.experiment(config)
    mesh = sharding.make_mesh(exp.mesh)
    tok = inputs.load_tokenizer(exp.data)
    test = list(inputs.task_split(exp.data, "test"))
    n = config.score_recipe.test_questions or len(test)
    test = test[:n]
    models = {"init": config.init_from, **{name: os.path.join(config.workdir, name) for name in RUNS
                                           if os.path.isdir(os.path.join(config.workdir, name))}}
    outcomes = {}
    for name, path in models.items():
        outcomes[name] = greedy_two_turn(*load_init(path, mesh), tok, test, mesh, max_new=exp.rl.max_new_tokens,
                                         max_prompt_len=exp.rl.max_prompt_len)
    rows = {name: row(o) for name, o in outcomes.items()}
    t2 = {k: [o["correct_t2"] for o in v] for k, v in outcomes.items()}
    base = "warmup" if "warmup" in outcomes else "init"
    base_t1 = [o["correct_t1"] for o in outcomes[base]]
    paired = {f"{k}_t2_vs_base_t1": stats.mcnemar_exact(base_t1, t2[k]) for k in rows if k not in ("init", base)}
    if "single" in t2:
        paired.update({f"{k}_t2_vs_single_t2": stats.mcnemar_exact(t2["single"], t2[k]) for k in ("stage1", "stage2")
                       if k in t2})
    result = {"num_test": n, "seed": config.seed, "init_from": config.init_from, "rows": rows, "paired_p": paired,
              "score": json.loads(config.score.to_json()), "score_recipe": json.loads(config.score_recipe.to_json()),
              "rl": json.loads(config.rl.to_json()), "train_minutes": {k: v / 60 for k, v in timings.items()},
              "peak_rss_gb": {k: trainer.done_info(os.path.join(config.workdir, k)).get("peak_rss_gb") for k in RUNS
                              if k in timings},
              # Per question, for tests pooled over seeds (`summarize`).
              "outcomes": {k: {"t1": [bool(o["correct_t1"]) for o in v], "t2": [bool(o["correct_t2"]) for o in v]}
                           for k, v in outcomes.items()}}
    files.write_json(os.path.join(config.workdir, "report.json"), result, indent=2)
    files.write_atomic(os.path.join(config.workdir, "report.md"), markdown(result))
    return result


def markdown(result: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    ci = lambda c: f"({pct(c[0])}-{pct(c[1])})"  # noqa: E731
    lines = [f"SCoRe, {result['num_test']} test questions, seed {result['seed']}, greedy at both turns.", "",
             "| model | Acc@t1 (95% CI) | Acc@t2 (95% CI) | delta | wrong->right | right->wrong | t2 = t1 | "
             "p (t2 vs t1) |", "| --- " * 8 + "|"]
    for name, r in result["rows"].items():
        lines.append(f"| {ROWS[name]} | {pct(r['acc_t1'])} {ci(r['ci95_t1'])} | {pct(r['acc_t2'])} {ci(r['ci95_t2'])}"
                     f" | {100 * r['delta']:+.1f} | {pct(r['delta_i2c'])} | {pct(r['delta_c2i'])} | "
                     f"{pct(r['identical'])} | {r['p_t2_vs_t1']:.3g} |")
    lines += ["", "Exact McNemar, same questions: " + "; ".join(
        f"{k.replace('_', ' ')} p = {v:.3g}" for k, v in result["paired_p"].items()), "",
              "Training minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in result["train_minutes"].items())]
    return "\n".join(lines) + "\n"


def summarize(workdirs: list[str]) -> str:
    """Several seeds' reports in one table: per-seed values, the mean with a Student-t 95% interval over
    seeds, and exact McNemar tests pooled over every (seed, question)."""
    from glore_jax.recipe import stats
    reports = [files.read_json_file(os.path.join(d, "report.json")) for d in workdirs]
    names = [k for k in ROWS if all(k in r["rows"] for r in reports)]
    base = "warmup" if "warmup" in names else "init"
    lines = [f"SCoRe over seeds {', '.join(str(r['seed']) for r in reports)}, {reports[0]['num_test']} test "
             "questions each, greedy at both turns; mean (95% t-interval over seeds).", "",
             "| model | Acc@t1 | Acc@t2 | delta | wrong->right | right->wrong | t2 = t1 |", "| --- " * 7 + "|"]
    for name in names:
        cells = []
        for key in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "identical"):
            mean, lo, hi = stats.mean_ci([100 * r["rows"][name][key] for r in reports])
            cells.append(f"{mean:.1f} ({lo:.1f} to {hi:.1f})" if len(reports) > 1 else f"{mean:.1f}")
        lines.append(f"| {ROWS[name]} | " + " | ".join(cells) + " |")
    pooled = {k: {t: [x for r in reports for x in r["outcomes"][k][t]] for t in ("t1", "t2")} for k in names}
    tests = {f"{k} t2 vs {k} t1": (pooled[k]["t1"], pooled[k]["t2"]) for k in names}
    tests.update({f"{k} t2 vs base t1": (pooled[base]["t1"], pooled[k]["t2"]) for k in names if k not in ("init", base)})
    if "single" in names and "stage2" in names:
        tests["stage2 t2 vs single t2"] = (pooled["single"]["t2"], pooled["stage2"]["t2"])
    lines += ["", "Exact McNemar pooled over every (seed, question): " + "; ".join(
        f"{k} p = {stats.mcnemar_exact(a, b):.3g}" for k, (a, b) in tests.items())]
    return "\n".join(lines) + "\n"


def run(config: ConfigDict) -> dict:
    timings = cli.train_runs(run_configs(config), lambda name: warmup_records(
        config, os.path.join(config.workdir, WARMUP_RECORDS)) if name == "warmup" else None)
    result = report(config, timings)
    print(markdown(result))
    return result


if __name__ == "__main__":
    cli.recipe_main(run, summarize, "configs/score_demo.py")
