"""Several seeds' pipeline runs in one table: each seed, the mean with a t-interval, pooled paired tests.

    python -m glore_jax.recipe.seeds workdir/demo_s0 workdir/demo_s1 workdir/demo_s2 [--out seeds.md]

One seed's test set is a few hundred questions and one trained model of each
kind, so differences between methods are reported three ways: per seed
(Wilson interval, McNemar p, in each report.md), as a mean over seeds with a
Student-t interval (how much a rerun moves), and as one exact McNemar test
over every (seed, question) pair pooled, for GLoRe against each baseline.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from glore_jax import files
from glore_jax.data.store import RecordsFile
from glore_jax.recipe import inference, stats
from glore_jax.recipe.report import row_names

VALUE_KEYS = ("step_auroc", "where_accuracy", "where_accuracy_at_half", "where_threshold", "step_balanced_accuracy",
              "final_auroc")


def load(workdir: str) -> tuple[dict, dict[str, list[bool]]]:
    """A run's report and its per-question outcomes (recomputed from the saved test rows at its threshold)."""
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    stage = os.path.join(workdir, "stages", "inference")
    name = "test_rows.jsonl" if os.path.exists(os.path.join(stage, "test_rows.jsonl")) else "rows.jsonl"  # older runs
    rows = list(RecordsFile(os.path.join(stage, name)))
    r = report["results"]
    chosen = (r["val_refiner_set"], r["val_refiner_set_threshold"]) if "val_refiner_set" in r else None
    return report, inference.outcomes(rows, r["orm_threshold"], chosen)


def aggregate(workdirs: Sequence[str]) -> dict:
    runs = [load(d) for d in workdirs]
    reports = [r for r, _ in runs]
    names = row_names(reports[0]["results"])
    best_of = next(k for k in names if k.startswith("best_of_"))
    out: dict = {"seeds": [r["seed"] for r in reports], "num_test": [r["num_test"] for r in reports],
                 "rows": {}, "value": {}, "pooled_p": {}, "per_seed": [r["results"] for r in reports],
                 "minutes": [sum(r["timings"].values()) / 60 for r in reports]}
    for key in names:
        vals = [r["results"].get(key, float("nan")) for r in reports]  # glore_val_set: newer runs only
        out["rows"][key] = {"per_seed": vals, "mean_ci": stats.mean_ci(vals)}
    for m in ("orm", "sorm"):
        for k in VALUE_KEYS:
            vals = [r["results"].get(f"{m}_{k}", float("nan")) for r in reports]   # newer keys: newer runs
            out["value"][f"{m}_{k}"] = {"per_seed": vals, "mean_ci": stats.mean_ci(vals)}
    # How the refiners compare with a fresh policy sample (`resample`), and what the gate did.
    out["refiners"] = {f"{name}_{what}": [r["results"].get(f"{name}_{what}", float("nan")) for r in reports]
                       for name in ("global", "local", "resample") for what in ("fixed_wrong", "broke_right")}
    # SORM minus ORM per seed, with each seed's bootstrap interval over its questions (newer runs only).
    out["sorm_minus_orm"] = {k: [r["results"].get(f"sorm_minus_orm_{k}") for r in reports]
                             for k in ("step_auroc", "where_accuracy")}
    out["gate"] = {k: [r["results"].get(k, float("nan")) for r in reports] for k in ("orm_threshold", "refine_rate")}
    pooled = {k: [x for _, acc in runs for x in acc[k]] for k in names}
    for base in ("greedy", best_of, next(k for k in names if k.startswith("greedy_plus_"))):
        out["pooled_p"][f"glore_vs_{base}"] = stats.mcnemar_exact(pooled[base], pooled["glore"])
    # Every row against greedy, pooled the same way: a mean over three seeds alone cannot tell a
    # +2-point row from noise, the paired test over 1,500 questions can.
    out["pooled_p_vs_greedy"] = {k: stats.mcnemar_exact(pooled["greedy"], pooled[k])
                                 for k in names if k != "greedy" and len(pooled[k]) == len(pooled["greedy"])}
    return out


def markdown(agg: dict) -> str:
    seeds = agg["seeds"]
    pct = lambda x: f"{100 * x:.1f}"
    head = "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (95% t-CI) |"
    sep = "| --- " * (len(seeds) + 2) + "|"
    pooled = agg.get("pooled_p_vs_greedy", {})
    lines = [f"Test questions per seed: {agg['num_test'][0]}; seeds {', '.join(map(str, seeds))}.", "",
             head.replace("| |", "| method (accuracy, %) |", 1) + " pooled p vs greedy |", sep + " --- |"]
    names = row_names({k: 0 for k in agg["rows"]})
    for key, name in names.items():
        row = agg["rows"][key]
        mean, lo, hi = row["mean_ci"]
        p = f"{pooled[key]:.3g}" if key in pooled else ""
        lines.append(f"| {name} | " + " | ".join(pct(v) for v in row["per_seed"])
                     + f" | {pct(mean)} ({pct(lo)} to {pct(hi)}) | {p} |")
    lines += ["", "Pooled exact McNemar over every (seed, question): "
              + "; ".join(f"{k.replace('_', ' ')} p = {v:.3g}" for k, v in agg["pooled_p"].items()), "",
              head.replace("| |", "| value model |", 1), sep]
    for key, v in agg["value"].items():
        mean, lo, hi = v["mean_ci"]
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(f"{x:.3f}" for x in v["per_seed"])
                     + f" | {mean:.3f} ({lo:.3f} to {hi:.3f}) |")
    for key, gaps in agg.get("sorm_minus_orm", {}).items():
        if all(gaps):
            lines.append(f"| SORM minus ORM {key.replace('_', ' ')} (95% bootstrap CI, p) | " + " | ".join(
                f"{g['diff']:+.3f} ({g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}, p "
                + (f"{g['p']:.2g})" if g["p"] else f"< {1 / g['resamples']:.1g})") for g in gaps)
                + " | |")
    if agg.get("refiners"):
        lines += ["", head.replace("| |", "| refiner (% of wrong drafts fixed / right drafts broken) |", 1), sep]
        for name in ("global", "local", "resample"):
            fixed, broke = agg["refiners"][f"{name}_fixed_wrong"], agg["refiners"][f"{name}_broke_right"]
            label = "resample (fresh T sample)" if name == "resample" else name
            lines.append(f"| {label} | " + " | ".join(f"{pct(f)} / {pct(b)}" for f, b in zip(fixed, broke))
                         + f" | {pct(sum(fixed) / len(fixed))} / {pct(sum(broke) / len(broke))} (mean) |")
        gate = agg["gate"]
        lines += ["", "ORM gate (calibrated on validation): threshold "
                  + ", ".join(f"{t:.3f}" for t in gate["orm_threshold"]) + "; share of test drafts refined "
                  + ", ".join(f"{pct(r)}%" for r in gate["refine_rate"])]
    lines += ["", "Wall-clock minutes per seed: " + ", ".join(f"{m:.1f}" for m in agg["minutes"])]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", default="", help="also write the markdown here (and JSON beside it)")
    args = parser.parse_args(argv)
    agg = aggregate(args.workdirs)
    md = markdown(agg)
    print(md)
    if args.out:
        files.write_atomic(args.out, md)
        files.write_json(os.path.splitext(args.out)[0] + ".json", agg, indent=2, default=float)


if __name__ == "__main__":
    main()
