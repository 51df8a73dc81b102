"""An RL run's result: greedy test accuracy before and after, with a paired test, and its training curve.

    python -m glore_jax.rl.evaluate --config=configs/rl_demo.py [--config.workdir=...]

Reads the starting policy (`init_from`) and the run's final model
(`<workdir>/model`), decodes every test question greedily with each, and
writes `<workdir>/rl_report.json` (accuracies with 95% Wilson intervals,
the exact McNemar p-value on the same questions, run time, peak memory) and
`<workdir>/rl_curve.png` (training reward and accuracy, and the periodic
greedy eval, against step).
"""

from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from glore_jax import cli, files

_CONFIG = config_flags.DEFINE_config_file("config", None, "The RL run's config file.", lock_config=True)


def greedy_correct(model, tokenizer, records, mesh, max_new: int, max_prompt_len: int) -> list[bool]:
    from glore_jax import prompts
    from glore_jax.sampling import Generator
    from glore_jax.tasks import is_correct
    gen = Generator(model[0], model[1], max_new=max_new, mesh=mesh, pad_id=tokenizer.pad_id,
                    vocab_limit=tokenizer.vocab_size, rows=64, max_prompt_len=max_prompt_len, tokenizer=tokenizer)
    texts = gen.complete([prompts.get("policy").prompt(tokenizer, r) for r in records])
    return [is_correct(t[0], r["gold"]) for t, r in zip(texts, records)]


def curve(workdir: str, temperature: float, steps: int, before: float, after: float, num_test: int) -> str:
    """Training reward (each logged step, and a running mean), periodic greedy accuracy, and greedy
    accuracy on the whole test split before and after, against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    rows, _ = files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    points = [(r["step"], r["reward"]) for r in rows if "reward" in r]
    if points:
        x, y = map(np.asarray, zip(*points))
        ax.plot(x, y, color="tab:blue", alpha=0.3, label=f"reward of the step's samples (T={temperature:g})")
        window = min(8, len(y))
        ax.plot(x[window - 1:], np.convolve(y, np.ones(window) / window, mode="valid"), color="tab:blue",
                label=f"reward, running mean of {window} logged steps")
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if evals:
        ax.plot(*zip(*evals), marker="o", color="tab:green", label="greedy accuracy, first test questions")
    ax.plot([0, steps], [before, after], marker="s", linestyle="--", color="tab:red",
            label=f"greedy accuracy, all {num_test} test questions")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction")
    ax.set_title("GRPO from the demo policy")
    ax.legend(fontsize=8)
    path = os.path.join(workdir, "rl_curve.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def evaluate(config) -> dict:
    from glore_jax import sharding, trainer
    from glore_jax.models import checkpoints as model_checkpoints
    from glore_jax.recipe import stats
    from glore_jax.training import config as train_config, inputs
    from glore_jax.training.checkpoints import load_init
    exp = train_config.experiment(config)
    mesh = sharding.make_mesh(exp.mesh)
    tokenizer = inputs.load_tokenizer(exp.data)
    test = list(inputs.task_split(exp.data, "test"))
    kw = dict(max_new=exp.rl.max_new_tokens, max_prompt_len=exp.data.max_len)
    before = greedy_correct(load_init(exp.init_from, mesh), tokenizer, test, mesh, **kw)
    after = greedy_correct(model_checkpoints.load_model(os.path.join(exp.workdir, "model"), mesh), tokenizer, test,
                           mesh, **kw)
    rows, _ = files.read_jsonl(os.path.join(exp.workdir, "metrics.jsonl"))
    done = trainer.done_info(exp.workdir)
    report = {"num_test": len(test), "init_from": exp.init_from, "steps": done.get("step"),
              "greedy_before": sum(before) / len(test), "greedy_after": sum(after) / len(test),
              "ci95_before": stats.wilson_interval(sum(before), len(test)),
              "ci95_after": stats.wilson_interval(sum(after), len(test)),
              "fixed": sum(a and not b for a, b in zip(after, before)),
              "broken": sum(b and not a for a, b in zip(after, before)),
              "p_mcnemar": stats.mcnemar_exact(after, before), "peak_rss_gb": done.get("peak_rss_gb"),
              "train_wall_seconds": done.get("wall_seconds"), "rl": json.loads(config.rl.to_json()),
              "final_metrics": rows[-1] if rows else {}}
    report["curve"] = curve(exp.workdir, exp.rl.temperature, report["steps"] or 0, report["greedy_before"],
                            report["greedy_after"], len(test))
    files.write_json(os.path.join(exp.workdir, "rl_report.json"), report, indent=2)
    print(json.dumps({k: report[k] for k in ("num_test", "greedy_before", "greedy_after", "fixed", "broken",
                                             "p_mcnemar", "peak_rss_gb")}, indent=1))
    return report


def main(argv):
    del argv
    evaluate(_CONFIG.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.main(main)
