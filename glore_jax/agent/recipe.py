"""RefineRL end to end: an SFT policy, single-turn GRPO and skeptical multi-turn RL from it, then a report.

    python -m glore_jax.agent.recipe --config=configs/refinerl_demo.py [--config.seed=1 --config.workdir=...]
    python -m glore_jax.agent.recipe --summarize=workdir/refinerl_s0,workdir/refinerl_s1 [--out=table.md]

`run_configs` derives one training job per run, each in `<workdir>/<run>`
(each resumes, or skips when finished, on rerun):

    sft        SFT from scratch on the task's two-turn agent traces (prompt format `agent`)
    grpo       `refinerl` with agent.turns = 1 from sft: GRPO on the hidden-test reward, one attempt
    refinerl   `refinerl` with the config's agent.* (skeptical, agent.turns) from sft

Both RL runs take the same steps, questions per step and group size. The
report runs greedy episodes on the test split and gives, with 95% Wilson
intervals and exact McNemar tests against RefineRL's final turn on the same
problems:

    sft_single    SFT, first attempt
    sft_refine    SFT, with agent.turns skeptical turns at inference only (no RL)
    grpo          GRPO, single attempt
    refinerl      RefineRL, final turn (and its first attempt, `refinerl_first`)

and for each multi-turn row the refinement turns that followed a program
passing its public tests: how many changed it, and of those how many fixed a
hidden failure or broke a right program. It also saves one transcript.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

from ml_collections import ConfigDict

from glore_jax import cli, files
from glore_jax.errors import ConfigError

RUNS = ("sft", "grpo", "refinerl")
ROWS = {"sft_single": "SFT, single attempt", "sft_refine": "SFT + skeptical refinement at inference (no RL)",
        "grpo": "GRPO, single turn", "refinerl_first": "RefineRL, first attempt",
        "refinerl": "RefineRL, final turn"}


def recipe_knobs() -> ConfigDict:
    r = ConfigDict()
    r.sft_steps = 400
    r.sft_learning_rate = 3e-3
    r.sft_batch_size = 32
    r.test_questions = 0        # 0 = the whole test split
    return r


def run_configs(config: ConfigDict) -> dict[str, ConfigDict]:
    """The training config of each run: sft, grpo, refinerl."""
    if "refinerl_recipe" not in config:
        raise ConfigError("this command needs refinerl_recipe.* knobs: start the config from configs/refinerl_demo.py")
    from glore_jax.agent.config import AgentConfig
    from glore_jax.rl.config import RLConfig
    AgentConfig(**config.agent.to_dict()).check()   # a bad knob fails before any training
    RLConfig(**config.rl.to_dict()).check(config.train.batch_size)
    r = config.refinerl_recipe
    if r.sft_steps < 1 or r.sft_batch_size < 1 or r.test_questions < 0:
        raise ConfigError("refinerl_recipe.sft_steps and sft_batch_size must be >= 1, test_questions >= 0")
    out = {}
    for name in RUNS:
        c = copy.deepcopy(config)
        c.unlock()
        c.workdir = os.path.join(config.workdir, name)
        # One prepared task and one tokenizer for all runs (each run's default would be its own copy).
        c.data.data_dir = config.data.data_dir or os.path.join(config.workdir, "data")
        if name == "sft":
            c.objective, c.data.prompt_format, c.init_from = "sft", "agent", ""
            c.train.total_steps, c.train.learning_rate = r.sft_steps, r.sft_learning_rate
            c.train.batch_size, c.train.warmup_steps, c.train.weight_decay = r.sft_batch_size, 30, 0.01
            c.train.checkpoint_every = max(1, r.sft_steps // 4)
        else:
            c.objective, c.init_from = "refinerl", os.path.join(config.workdir, "sft")
            if name == "grpo":
                c.agent.turns = 1
        c.lock()
        out[name] = c
    return out


def _episodes(model, params, tok, records, mesh, exp, turns: int):
    from glore_jax.agent.episodes import run_episodes
    from glore_jax.agent.rollouts import shape_of
    from glore_jax.agent.tools import tool_for
    return run_episodes(model, params, tok, records, tool_for(exp.data.task, exp.agent.reward), mesh,
                        shape_of(exp.rl, dataclasses.replace(exp.agent, turns=turns)),
                        skeptical=exp.agent.skeptical, rows=64)


def transcript(tok, episode) -> str:
    """One episode as the agent saw it: question, each attempt, each report."""
    lines = [f"question: {episode.record['question']}"]
    for t, (text, check) in enumerate(zip(episode.texts, episode.checks), 1):
        lines += [f"--- turn {t} (hidden tests {'pass' if check.solved else 'FAIL'})", text,
                  f"--- tool: {check.report}"]
    return "\n".join(lines)


def report(config: ConfigDict, timings: dict[str, float]) -> dict:
    from glore_jax import sharding
    from glore_jax.agent.episodes import episode_metrics, turn_counts
    from glore_jax.recipe import stats
    from glore_jax.training import config as train_config, inputs
    from glore_jax.training.checkpoints import load_init
    t0 = time.perf_counter()
    exp = train_config.experiment(config)
    mesh = sharding.make_mesh(exp.mesh)
    tok = inputs.load_tokenizer(exp.data)
    test = list(inputs.task_split(exp.data, "test"))
    test = test[:config.refinerl_recipe.test_questions or len(test)]
    T = exp.agent.turns
    eps = {name: _episodes(*load_init(os.path.join(config.workdir, name), mesh), tok, test, mesh, exp,
                           1 if name == "grpo" else T) for name in RUNS}
    outcomes = {"sft_single": [e.checks[0].solved for e in eps["sft"]],
                "sft_refine": [e.final.solved for e in eps["sft"]],
                "grpo": [e.final.solved for e in eps["grpo"]],
                "refinerl_first": [e.checks[0].solved for e in eps["refinerl"]],
                "refinerl": [e.final.solved for e in eps["refinerl"]]}
    rows = {k: {"n": len(v), "pass1": sum(v) / len(v), "ci95": stats.wilson_interval(sum(v), len(v))}
            for k, v in outcomes.items()}
    paired = {f"refinerl_vs_{k}": stats.mcnemar_exact(outcomes[k], outcomes["refinerl"])
              for k in ("sft_single", "sft_refine", "grpo", "refinerl_first")}
    turns = {name: episode_metrics(eps[name]) for name in ("sft", "refinerl")}
    example = next((e for e in eps["refinerl"] if turn_counts(e)["fixed"]), None) or \
        next((e for e in eps["refinerl"] if e.final.solved != e.checks[0].solved), eps["refinerl"][0])
    logged, _ = files.read_jsonl(os.path.join(config.workdir, "refinerl", "metrics.jsonl"))
    shares = [r["tool_share"] for r in logged if "tool_share" in r]
    result = {"num_test": len(test), "seed": config.seed, "turns": T, "skeptical": exp.agent.skeptical,
              "rows": rows, "paired_p": paired, "turn_metrics": turns,
              "agent": json.loads(config.agent.to_json()), "rl": json.loads(config.rl.to_json()),
              "recipe": json.loads(config.refinerl_recipe.to_json()), "rl_steps": config.train.total_steps,
              "tool_share_of_rollout": sum(shares) / len(shares) if shares else None,
              "train_minutes": {k: v / 60 for k, v in timings.items()},
              "report_minutes": (time.perf_counter() - t0) / 60, "transcript": transcript(tok, example),
              "outcomes": outcomes}
    files.write_json(os.path.join(config.workdir, "report.json"), result, indent=2)
    files.write_atomic(os.path.join(config.workdir, "report.md"), markdown(result))
    return result


def markdown(result: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"RefineRL on {result['num_test']} held-out programs, seed {result['seed']}: greedy, hidden-test pass@1; "
             f"{result['turns']} turns, skeptical={result['skeptical']}.", "",
             "| model | pass@1 (95% CI) | McNemar p vs RefineRL final |", "| --- | --- | --- |"]
    for name, r in result["rows"].items():
        p = result["paired_p"].get(f"refinerl_vs_{name}")
        lines.append(f"| {ROWS[name]} | {pct(r['pass1'])} ({pct(r['ci95'][0])}-{pct(r['ci95'][1])}) | "
                     f"{'' if p is None else f'{p:.3g}'} |")
    o = result["outcomes"]
    moves = {label: (sum((not x) and y for x, y in zip(o[a], o[b])), sum(x and not y for x, y in zip(o[a], o[b])))
             for label, a, b in (("SFT (inference only)", "sft_single", "sft_refine"),
                                 ("RefineRL", "refinerl_first", "refinerl"))}
    lines += ["", "First attempt -> final turn, every problem: " + "; ".join(
        f"{label} wrong->right {ic}, right->wrong {ci}" for label, (ic, ci) in moves.items()) + "."]
    lines += ["", "Refinement turns after a program passed its public tests:", "",
              "| model | such turns | changed the program | fixed a hidden failure | broke a right program |",
              "| --- | --- | --- | --- | --- |"]
    for name, m in result["turn_metrics"].items():
        lines.append(f"| {'SFT (inference only)' if name == 'sft' else 'RefineRL'} | {m['passing_turns']} | "
                     f"{m['changed_passing_count']} | {m['fixed']} | {m['broke']} |")
    cut = {k: m.get("obs_cut") for k, m in result["turn_metrics"].items()}
    lines += ["", "Reports cut to agent.max_obs_tokens (share of refinement turns; unseen input when > 0): "
              + ", ".join(f"{k} {v if v is None else f'{100 * v:.1f}%'}" for k, v in cut.items())]
    share = result["tool_share_of_rollout"]
    lines += ["", f"Sandbox time, share of RefineRL's rollout time: {'n/a' if share is None else f'{100 * share:.1f}%'}",
              "", "Minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in result["train_minutes"].items())
              + f", report {result['report_minutes']:.1f}", "", "Example episode (RefineRL, greedy):", "", "```",
              result["transcript"], "```"]
    return "\n".join(lines) + "\n"


def summarize(workdirs: list[str]) -> str:
    """Several seeds' reports: mean pass@1 with a t-interval over seeds, and McNemar pooled over
    every (seed, problem)."""
    from glore_jax.recipe import stats
    reports = [files.read_json_file(os.path.join(d, "report.json")) for d in workdirs]
    lines = [f"RefineRL over seeds {', '.join(str(r['seed']) for r in reports)}, {reports[0]['num_test']} problems "
             "each; mean pass@1 (95% t-interval over seeds).", "", "| model | pass@1 | RefineRL - model, per seed |",
             "| --- | --- | --- |"]
    for name in ROWS:
        mean, lo, hi = stats.mean_ci([100 * r["rows"][name]["pass1"] for r in reports])
        diffs = [100 * (r["rows"]["refinerl"]["pass1"] - r["rows"][name]["pass1"]) for r in reports]
        dm, dlo, dhi = stats.mean_ci(diffs)
        lines.append(f"| {ROWS[name]} | {mean:.1f} ({lo:.1f} to {hi:.1f}) | "
                     + ("" if name == "refinerl" else f"{dm:+.1f} ({dlo:+.1f} to {dhi:+.1f}; "
                        + " / ".join(f"{d:+.1f}" for d in diffs) + ")") + " |")
    pooled = {k: [x for r in reports for x in r["outcomes"][k]] for k in ROWS}
    lines += ["", "Exact McNemar pooled over every (seed, problem): " + "; ".join(
        f"refinerl vs {k} p = {stats.mcnemar_exact(pooled[k], pooled['refinerl']):.3g}" for k in ROWS if k != "refinerl")]
    return "\n".join(lines) + "\n"


def run(config: ConfigDict) -> dict:
    result = report(config, cli.train_runs(run_configs(config)))
    print(markdown(result))
    return result


if __name__ == "__main__":
    cli.recipe_main(run, summarize, "configs/refinerl_demo.py")
