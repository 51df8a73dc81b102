"""LaTRO end to end: LaTRO and the answer-only SFT baseline from one policy, then a held-out report.

    python -m glore_jax.rl.latro_recipe --config=configs/latro_demo.py [--config.workdir=... --config.seed=1]
    python -m glore_jax.rl.latro_recipe --summarize=workdir/latro_s0,workdir/latro_s1 [--out=table.md]

The config is an ordinary `latro` training config plus `latro_recipe.*`.
`run_configs` derives one training job per run, each in `<workdir>/<run>`
(each resumes, or skips when finished, on rerun):

    latro       the `latro` objective from `init_from`, train.total_steps steps
    sft_answer  SFT from `init_from` on answer-only targets (the answer format's example: question ->
                "#### {gold}" or "The answer is {gold}."), the same steps and batch size (as many
                updates and examples as LaTRO has rationales): the paper's baseline, which sees the same
                signal (gold answers, no rationales)

Then each model (the starting policy, sft_answer, latro) answers every test
question greedily and by self-consistency (the majority answer of
`sc_samples` samples at `sc_temperature`). `<workdir>/report.{json,md}`
gives the accuracies with 95% Wilson intervals and exact McNemar tests on
the same questions, and `latro_curve.png` the self-reward and the evidence
lower bound (mean KL-adjusted reward) against step.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import time

from ml_collections import ConfigDict

from glore_jax import cli, files
from glore_jax.errors import ConfigError

RUNS = ("latro", "sft_answer")
ROWS = {"init": "SFT policy (start)", "sft_answer": "SFT continued on answer-only targets", "latro": "LaTRO"}


def recipe_knobs() -> ConfigDict:
    r = ConfigDict()
    r.sft_learning_rate = 1e-4  # the baseline's rate (its steps and batch size are LaTRO's)
    r.test_questions = 0        # 0 = the whole test split
    r.sc_samples = 8            # self-consistency: majority of this many samples
    r.sc_temperature = 0.7
    return r


def run_configs(config: ConfigDict) -> dict[str, ConfigDict]:
    """The training config of each run: `latro` and `sft_answer`."""
    if "latro_recipe" not in config:
        raise ConfigError("this command needs latro_recipe.* knobs: start the config from configs/latro_demo.py")
    if not config.init_from:
        raise ConfigError("init_from must name the policy LaTRO starts from (a saved model or workdir)")
    from glore_jax.rl.config import LatroConfig
    LatroConfig(**config.latro.to_dict()).check(config.train.batch_size)  # a bad knob fails before sampling
    r = config.latro_recipe
    if r.sc_samples < 1 or r.test_questions < 0 or r.sc_temperature <= 0:
        raise ConfigError("latro_recipe.sc_samples must be >= 1, test_questions >= 0 and sc_temperature > 0")
    out = {}
    for name in RUNS:
        c = copy.deepcopy(config)
        c.unlock()
        c.workdir = os.path.join(config.workdir, name)
        if name == "sft_answer":
            # Rows as wide as LaTRO's prompts plus an answer: answer-only examples are short.
            c.objective, c.data.prompt_format = "sft", config.latro.answer_format
            c.data.max_len = config.latro.max_prompt_len + 16
            c.train.learning_rate = r.sft_learning_rate
        else:
            c.objective = "latro"
        c.lock()
        out[name] = c
    return out


def majority(texts: list[str]) -> str | None:
    """The most common extracted answer (normalised numbers; ties: the first seen), or None."""
    from glore_jax.tasks.answers import extract_answer, normalize_number
    answers = [a for a in (extract_answer(t) for t in texts) if a is not None]
    keys = [normalize_number(a) or a for a in answers]
    if not keys:
        return None
    counts = collections.Counter(keys)
    return max(keys, key=lambda k: (counts[k], -keys.index(k)))


def evaluate(model, params, tok, records, mesh, *, max_new: int, max_prompt_len: int, sc_samples: int,
             sc_temperature: float, seed: int) -> dict[str, list[bool]]:
    """Per question: greedy correctness, and self-consistency correctness."""
    from glore_jax import prompts
    from glore_jax.prompts import fit_prompt
    from glore_jax.sampling import Generator
    from glore_jax.tasks import is_correct
    from glore_jax.tasks.answers import answers_match
    gen = Generator(model, params, max_new=max_new, mesh=mesh, pad_id=tok.pad_id, vocab_limit=tok.vocab_size,
                    rows=64, max_prompt_len=max_prompt_len, tokenizer=tok)
    ids = [fit_prompt(prompts.get("policy").prompt(tok, r), max_prompt_len)[0] for r in records]
    greedy = [t[0] for t in gen.complete(ids)]
    samples = gen.complete(ids, k=sc_samples, temperature=sc_temperature, seed=seed)
    return {"greedy": [is_correct(t, r["gold"]) for t, r in zip(greedy, records)],
            "sc": [answers_match(majority(s), r["gold"]) for s, r in zip(samples, records)]}


def row(outcome: dict[str, list[bool]]) -> dict:
    from glore_jax.recipe import stats
    n = len(outcome["greedy"])
    out = {"n": n}
    for mode in ("greedy", "sc"):
        k = sum(outcome[mode])
        out[mode], out[f"ci95_{mode}"] = k / n, stats.wilson_interval(k, n)
    return out


def curve(workdir: str, out_path: str) -> None:
    """Self-reward (mean r, after the non-stop penalty) and the ELBO (mean r - beta KL) against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, _ = files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    rows = [r for r in rows if "elbo" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = [r["step"] for r in rows]
    import numpy as np
    for key, color, label in (("reward", "tab:blue", "self-reward log p(y | x, z)"),
                              ("elbo", "tab:orange", "ELBO: self-reward - beta KL")):
        y = np.asarray([r[key] for r in rows])
        ax.plot(steps, y, color=color, alpha=0.3, label=f"{label}, batch mean")
        # Each step's questions differ, and their difficulty dominates a batch's mean: smooth it.
        window = min(8, len(y))
        if window:
            ax.plot(steps[window - 1:], np.convolve(y, np.ones(window) / window, mode="valid"), color=color,
                    label=f"{label}, running mean of {window} logged steps")
    ax.set_xlabel("step")
    ax.set_ylabel("nats")
    ax.set_title("LaTRO from the demo policy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def report(config: ConfigDict, timings: dict[str, float]) -> dict:
    from glore_jax import sharding, trainer
    from glore_jax.recipe import stats
    from glore_jax.training import config as train_config, inputs
    from glore_jax.training.checkpoints import load_init
    t0 = time.perf_counter()
    exp = train_config.experiment(config)
    r = config.latro_recipe
    mesh = sharding.make_mesh(exp.mesh)
    tok = inputs.load_tokenizer(exp.data)
    test = list(inputs.task_split(exp.data, "test"))
    test = test[:r.test_questions or len(test)]
    paths = {k: config.init_from if k == "init" else os.path.join(config.workdir, k) for k in ROWS}
    outcomes = {name: evaluate(*load_init(path, mesh), tok, test, mesh, max_new=exp.latro.max_rationale_tokens + 16,
                               max_prompt_len=exp.latro.max_prompt_len, sc_samples=r.sc_samples,
                               sc_temperature=r.sc_temperature, seed=config.seed)
                for name, path in paths.items()}
    paired = {f"latro_vs_{base}_{mode}": stats.mcnemar_exact(outcomes[base][mode], outcomes["latro"][mode])
              for base in ("init", "sft_answer") for mode in ("greedy", "sc")}
    curve(os.path.join(config.workdir, "latro"), os.path.join(config.workdir, "latro_curve.png"))
    logged, _ = files.read_jsonl(os.path.join(config.workdir, "latro", "metrics.jsonl"))
    elbo = [r["elbo"] for r in logged if "elbo" in r]
    result = {"num_test": len(test), "seed": config.seed, "init_from": config.init_from,
              "rows": {k: row(v) for k, v in outcomes.items()}, "paired_p": paired,
              "latro": json.loads(config.latro.to_json()), "latro_recipe": json.loads(r.to_json()),
              "steps": config.train.total_steps, "batch_size": config.train.batch_size,
              "elbo_first_last_10": [sum(elbo[:10]) / max(len(elbo[:10]), 1), sum(elbo[-10:]) / max(len(elbo[-10:]), 1)],
              "train_minutes": {k: v / 60 for k, v in timings.items()},
              "peak_rss_gb": {k: trainer.done_info(os.path.join(config.workdir, k)).get("peak_rss_gb") for k in RUNS},
              "report_minutes": (time.perf_counter() - t0) / 60,
              "outcomes": outcomes}  # per question, for tests pooled over seeds (`summarize`)
    files.write_json(os.path.join(config.workdir, "report.json"), result, indent=2)
    files.write_atomic(os.path.join(config.workdir, "report.md"), markdown(result))
    return result


def markdown(result: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    ci = lambda c: f"({pct(c[0])}-{pct(c[1])})"  # noqa: E731
    sc = result["latro_recipe"]
    lines = [f"LaTRO, {result['num_test']} test questions, seed {result['seed']}: greedy, and self-consistency "
             f"(majority of {sc['sc_samples']} samples at T={sc['sc_temperature']:g}).", "",
             "| model | greedy (95% CI) | self-consistency (95% CI) |", "| --- | --- | --- |"]
    for name, r in result["rows"].items():
        lines.append(f"| {ROWS[name]} | {pct(r['greedy'])} {ci(r['ci95_greedy'])} | {pct(r['sc'])} {ci(r['ci95_sc'])} |")
    first, last = result["elbo_first_last_10"]
    lines += ["", "Exact McNemar, same questions: " + "; ".join(
        f"{k.replace('_', ' ')} p = {v:.3g}" for k, v in result["paired_p"].items()), "",
              f"ELBO (mean of the first / last 10 logged steps): {first:.2f} -> {last:.2f} nats", "",
              "Minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in result["train_minutes"].items())
              + (f", report {result['report_minutes']:.1f}" if "report_minutes" in result else "")]
    return "\n".join(lines) + "\n"


def summarize(workdirs: list[str]) -> str:
    """Several seeds' reports in one table: the mean with a Student-t 95% interval over seeds, and exact
    McNemar tests pooled over every (seed, question)."""
    from glore_jax.recipe import stats
    reports = [files.read_json_file(os.path.join(d, "report.json")) for d in workdirs]
    lines = [f"LaTRO over seeds {', '.join(str(r['seed']) for r in reports)}, {reports[0]['num_test']} test "
             "questions each; mean (95% t-interval over seeds).", "",
             "| model | greedy | self-consistency |", "| --- | --- | --- |"]
    for name in ROWS:
        cells = []
        for mode in ("greedy", "sc"):
            mean, lo, hi = stats.mean_ci([100 * r["rows"][name][mode] for r in reports])
            cells.append(f"{mean:.1f} ({lo:.1f} to {hi:.1f})" if len(reports) > 1 else f"{mean:.1f}")
        lines.append(f"| {ROWS[name]} | " + " | ".join(cells) + " |")
    for base in ("init", "sft_answer"):   # the paired quantity: each seed's difference on its own policy
        cells = []
        for mode in ("greedy", "sc"):
            diffs = [100 * (r["rows"]["latro"][mode] - r["rows"][base][mode]) for r in reports]
            mean, lo, hi = stats.mean_ci(diffs)
            per_seed = " / ".join(f"{d:+.1f}" for d in diffs)
            cells.append(f"{mean:+.1f} ({lo:+.1f} to {hi:+.1f}; {per_seed})" if len(reports) > 1 else f"{mean:+.1f}")
        lines.append(f"| LaTRO - {ROWS[base]} (per seed) | " + " | ".join(cells) + " |")
    pooled = {k: {m: [x for r in reports for x in r["outcomes"][k][m]] for m in ("greedy", "sc")} for k in ROWS}
    lines += ["", "Exact McNemar pooled over every (seed, question): " + "; ".join(
        f"latro vs {base} {m} p = {stats.mcnemar_exact(pooled[base][m], pooled['latro'][m]):.3g}"
        for base in ("init", "sft_answer") for m in ("greedy", "sc"))]
    return "\n".join(lines) + "\n"


def run(config: ConfigDict) -> dict:
    result = report(config, cli.train_runs(run_configs(config)))
    print(markdown(result))
    return result


if __name__ == "__main__":
    cli.recipe_main(run, summarize, "configs/latro_demo.py")
