"""The pipeline's report: `report.json`, a pasteable `report.md`, and PNG plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

ROW_ORDER = ("greedy", "best_of_3", "global", "local", "glore", "oracle", "oracle_any")
ROW_NAMES = {
    "greedy": "Greedy draft",
    "best_of_3": "Best of 3 samples, ORM rerank",
    "global": "Global refinement, ORM-gated + rerank",
    "local": "Local refinement (SORM-located), ORM-gated + rerank",
    "glore": "Global + local, ORM rerank (GLoRe)",
    "oracle": "Global + local, oracle gating (refine only wrong drafts)",
    "oracle_any": "Upper bound: draft or any refinement correct",
}


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def markdown(report: Mapping) -> str:
    r = report["results"]
    lines = [f"# GLoRe report: {report.get('task', '?')} / {report.get('preset', '?')} (seed {report.get('seed')})",
             "", f"Test questions: {report.get('num_test', '?')}", "",
             "| method | accuracy |", "| --- | --- |"]
    lines += [f"| {ROW_NAMES[k]} | {_pct(r.get(k))} |" for k in ROW_ORDER if k in r]
    lines += ["", "| value model | step accuracy | final-answer accuracy |", "| --- | --- | --- |",
              f"| ORM | {_pct(r.get('orm_step_accuracy'))} | {_pct(r.get('orm_final_accuracy'))} |",
              f"| SORM | {_pct(r.get('sorm_step_accuracy'))} | {_pct(r.get('sorm_final_accuracy'))} |",
              "", "| refiner | wrong drafts fixed | right drafts broken |", "| --- | --- | --- |"]
    for name in ("global", "local"):
        lines.append(f"| {name} | {_pct(r.get(f'{name}_fixed_wrong'))} | {_pct(r.get(f'{name}_broke_right'))} |")
    lines += ["", f"ORM refines {_pct(r.get('refine_rate'))} of drafts. Step accuracy is measured against "
              f"{report.get('step_truth', 'ground truth')}."]
    if report.get("timings"):
        lines += ["", "Stage wall-clock (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items())]
    return "\n".join(lines) + "\n"


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    import matplotlib.pyplot as plt
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(report: Mapping, out_dir: str) -> list[str]:
    """Per-step accuracy of ORM vs SORM, and their calibration curves."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    evals = {name: report["value_eval"][name] for name in ("orm", "sorm") if name in report.get("value_eval", {})}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, ev in evals.items():
        idx = sorted(int(i) for i in ev["per_step_accuracy"])
        ax.plot(idx, [ev["per_step_accuracy"][str(i)] for i in idx], marker="o", label=name.upper())
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    paths.append(_finish(fig, ax, "step index", "step-label accuracy", "Per-step accuracy vs ground truth",
                         os.path.join(out_dir, "step_accuracy.png")))

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    for name, ev in evals.items():
        cal = ev["calibration"]
        ax.plot([c["mean_pred"] for c in cal], [c["frac_positive"] for c in cal], marker="o", label=name.upper())
    paths.append(_finish(fig, ax, "predicted P(correct)", "fraction positive", "Calibration",
                         os.path.join(out_dir, "calibration.png")))
    return paths


def write_report(report: Mapping, out_dir: str) -> str:
    """Writes report.json, report.md and the plots atomically; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    md = markdown(report)
    for name, text in (("report.md", md), ("report.json", json.dumps(report, indent=2, default=float))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
    plots(report, out_dir)
    return md
