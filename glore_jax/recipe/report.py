"""The pipeline's report: `report.json`, a pasteable `report.md`, and PNG plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

from glore_jax import files

def row_names(results: Mapping) -> dict[str, str]:
    """Row key -> label, in table order; best-of-N and greedy+(N-1) use the configured N."""
    n = next((int(k.split("_")[-1]) for k in results if k.startswith("best_of_")), 3)
    return {
        "greedy": "Greedy draft",
        f"best_of_{n}": f"Best of {n} samples, ORM rerank",
        f"greedy_plus_{n - 1}": f"Greedy draft + {n - 1} samples, ORM rerank",
        "global": "Global refinement, ORM-gated + rerank",
        "local": "Local refinement (SORM-located), ORM-gated + rerank",
        "glore": "Global + local, ORM-gated + rerank (GLoRe)",
        # Only in runs whose calibration chose a refiner set (see inference.calibrate_refiners).
        **({"glore_val_set": "GLoRe, refiner set and gate chosen on validation"} if "glore_val_set" in results else {}),
        "oracle": "Global + local, oracle gating (refine only wrong drafts)",
        "oracle_any": "Upper bound: draft or any refinement correct",
    }


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(x) -> str:
    return "n/a" if x is None else ("<0.001" if x < 1e-3 else f"{x:.3f}")


def _same_questions_note(report: Mapping) -> str:
    """With glore.value_eval_split=val, where-accuracy is read on the questions `locate` chose the
    thresholds on (other samples of them): say so, since the figure is then optimistic."""
    if report.get("value_eval_split") == "val" and report.get("stages", {}).get("locate", {}).get("calibrated"):
        return (" The thresholds were chosen on these same validation questions (stage `locate`, other samples),"
                " so these where-accuracies are optimistic; compare variants by them, report test.")
    return ""


def markdown(report: Mapping) -> str:
    r = report["results"]
    ci, pv = r.get("ci95", {}), r.get("p_vs_greedy", {})
    lines = [f"# GLoRe report: {report.get('task', '?')} / {report.get('preset', '?')} (seed {report.get('seed')})",
             "", f"Test questions: {report.get('num_test', '?')}. Intervals: 95% Wilson; p: exact McNemar "
             "test against greedy on the same questions.", "",
             "| method | accuracy | 95% CI | p vs greedy |", "| --- | --- | --- | --- |"]
    for key, name in row_names(r).items():
        if key in r:
            lo_hi = ci.get(key)
            interval = f"{_pct(lo_hi[0])} to {_pct(lo_hi[1])}" if lo_hi else "n/a"
            lines.append(f"| {name} | {_pct(r[key])} | {interval} | {_p(pv.get(key)) if key != 'greedy' else ''} |")
    lines += ["", f"The ORM gate refines drafts whose P(correct) is below {_num(r.get('orm_threshold'))} "
              f"(calibrated on validation questions): {_pct(r.get('refine_rate'))} of test drafts."
              + (f" On validation, the rerank is best over {r['val_refiner_set']} with its own gate at "
                 f"{_num(r.get('val_refiner_set_threshold'))} (the `glore_val_set` row)."
                 if "val_refiner_set" in r else ""), "",
              "| value model | step AUROC | step balanced acc. | step acc. | final AUROC | final acc. | "
              "where-accuracy |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in ("orm", "sorm"):
        lines.append(f"| {m.upper()} | {_num(r.get(f'{m}_step_auroc'))} | {_pct(r.get(f'{m}_step_balanced_accuracy'))} "
                     f"| {_pct(r.get(f'{m}_step_accuracy'))} | {_num(r.get(f'{m}_final_auroc'))} | "
                     f"{_pct(r.get(f'{m}_final_accuracy'))} | {_pct(r.get(f'{m}_where_accuracy'))} |")
    gaps = [(name, r[f"sorm_minus_orm_{key}"]) for key, name in (("step_auroc", "step AUROC"),
                                                                  ("where_accuracy", "where-accuracy"))
            if f"sorm_minus_orm_{key}" in r]
    lines += ["", f"Measured against {report.get('step_truth', 'ground truth')}. Where-accuracy: share of wrong "
              "samples whose first wrong step the model's locator (the first step below its threshold) finds exactly;"
              f" thresholds ORM {_num(r.get('orm_where_threshold'))}, SORM {_num(r.get('sorm_where_threshold'))}"
              f" (at 0.5: ORM {_pct(r.get('orm_where_accuracy_at_half'))}, SORM "
              f"{_pct(r.get('sorm_where_accuracy_at_half'))})." + _same_questions_note(report)
              + (" SORM minus ORM (95% interval and p from a bootstrap over questions): " + "; ".join(
                  f"{name} {g['diff']:+.3f} ({g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}, p = {_p(g['p'])})"
                  for name, g in gaps) + "." if gaps else ""), "",
              f"SORM rollout labels against exact truth: precision {_pct(r.get('sorm_label_precision'))}, "
              f"recall {_pct(r.get('sorm_label_recall'))}.", "",
              "| refiner | wrong drafts fixed | right drafts broken |", "| --- | --- | --- |"]
    for name in ("global", "local", "resample"):
        c = r.get(f"{name}_counts", {})
        if not c:
            continue
        label = "resample (a policy sample at temperature T, the draft ignored)" if name == "resample" else name
        lines.append(f"| {label} | {_pct(r.get(f'{name}_fixed_wrong'))} ({c.get('fixed', '?')}/{c.get('wrong_drafts', '?')}) "
                     f"| {_pct(r.get(f'{name}_broke_right'))} ({c.get('broke', '?')}/{c.get('right_drafts', '?')}) |")
    if r.get("orm_candidate_auroc"):
        lines += ["", "ORM AUROC (right vs wrong) on each candidate it reranks: " + ", ".join(
            f"{k} {_num(v)}" for k, v in r["orm_candidate_auroc"].items()) + "."]
    if r.get("refine_pairs_by_source"):
        src = r["refine_pairs_by_source"]
        lines += ["", "Refinement pairs by source: " + "; ".join(
            f"{kind}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) for kind, counts in src.items())]
    for stage, trained in (report.get("policy_training") or {}).items():
        if trained.get("stopped_early"):
            stop = trained["stopped_early"]
            cap = report.get("config", {}).get("stages", {}).get(stage.split("_")[0], {}).get("total_steps", "?")
            lines += ["", f"`{stage}` stopped at step {stop['step']} of {cap}: validation greedy accuracy "
                      f"{_pct(stop['value'])} reached glore.policy_val_target."]
    ei = report.get("expert_iteration")
    if ei and ei.get("rounds"):
        lines += ["", f"Expert Iteration ({ei['rounds']} round(s)): validation greedy accuracy "
                  f"{_pct(ei['val_greedy_before'])} -> {_pct(ei['val_greedy_after'])}; sample accuracy on train "
                  f"questions {_pct(ei['sample_accuracy_before'])} -> {_pct(ei['sample_accuracy_after'])}; "
                  f"{ei['distinct_correct_added']} distinct correct samples added."]
    trunc = report.get("truncation", {})
    if trunc.get("per_stage"):
        warnings = trunc.get("warnings") or []
        lines += ["", "Length limits: " + ("; ".join(warnings) if warnings else "nothing was cut in more than 1% of "
                                           "any stage's prompts, targets or completions") + "."]
    if report.get("timings"):
        total = sum(report["timings"].values())
        lines += ["", f"Stage wall-clock (s, total {total:.0f}): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items())]
    compiled = report.get("compile_timings") or {}
    if compiled:
        spent = sum(c.get("compile_seconds", 0.0) for c in compiled.values())
        hits = sum(c.get("compile_cache_hits", 0) for c in compiled.values())
        saved = sum(c.get("compile_seconds_saved", 0.0) for c in compiled.values())
        lines += ["", f"Of that, tracing and compiling XLA programs: {spent:.0f} s; {hits} programs came from the "
                  f"compile cache (glore.compile_cache), saving ~{saved:.0f} s of compiling."]
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
        files.write_atomic(os.path.join(out_dir, name), text)
    plots(report, out_dir)
    return md
