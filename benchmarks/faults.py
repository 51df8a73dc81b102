"""Fault injection: kill training and the pipeline at random points, corrupt checkpoints, compare with a clean run.

    python benchmarks/faults.py [--quick] [--seed 0] [--out benchmarks/faults.json]

Training: `python -m glore_jax.train` on the smoke config is SIGKILLed (or
SIGTERMed) at random moments and restarted until it finishes; at some kills
the newest checkpoint step is also damaged (bytes zeroed or the file
truncated), which the restart must detect, move aside and fall back from.
The final params must equal an uninterrupted run's. Pipeline: the smoke
pipeline is killed once inside each of several random stages, with the
running stage's newest checkpoint damaged at some of them, and restarted
until it finishes; its report's results must equal an uninterrupted run's.
Every 4th kill is a SIGTERM (a preemption notice) instead of a SIGKILL.

Prints and saves: points, kills, corruptions, mismatches, per part.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import cpu_info, save  # noqa: E402

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _train_cmd(workdir: pathlib.Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "glore_jax.train", "--config=configs/smoke.py", f"--config.workdir={workdir}",
            f"--config.train.total_steps={steps}", "--config.train.checkpoint_every=4", "--config.train.log_every=1",
            "--config.train.max_to_keep=3", "--config.train.eval_every=0"]


def _pipeline_cmd(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "glore_jax.pipeline", "--config=configs/smoke.py", f"--config.workdir={workdir}"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=3600)


def _damage(root: pathlib.Path, rng: random.Random) -> str | None:
    """Zeroes or truncates the largest file of the latest checkpoint step under `root`; what it did, or None."""
    steps = [p for p in root.rglob("checkpoints/*") if p.is_dir() and p.name.isdigit()]
    if not steps:
        return None
    # The newest step of the most recently written workdir: what the restart will try first.
    newest_dir = max({p.parent for p in steps}, key=lambda d: max(q.stat().st_mtime for q in d.iterdir()))
    step = max((p for p in steps if p.parent == newest_dir), key=lambda p: int(p.name))
    files = [p for p in step.rglob("*") if p.is_file() and p.name not in ("glore_checksums.json",
                                                                            "_CHECKPOINT_METADATA")]
    target = max(files, key=lambda p: p.stat().st_size)
    if rng.random() < 0.5:
        data = bytearray(target.read_bytes())
        start = len(data) // 3
        data[start:start + 256] = bytes(min(256, len(data) - start))
        target.write_bytes(bytes(data))
        how = "zeroed"
    else:
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)
        how = "truncated"
    return f"{how} {target.relative_to(root)}"


def _last_step(metrics: pathlib.Path) -> int:
    try:
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0  # absent, or a torn last line being written


def _kill(proc: subprocess.Popen, rng: random.Random, root: pathlib.Path, corrupt_p: float, log: list,
          event: dict) -> int:
    """Kills `proc` (mostly SIGKILL, sometimes SIGTERM), maybe damages a checkpoint; returns 1 if it corrupted."""
    sig = signal.SIGTERM if len(log) % 4 == 3 else signal.SIGKILL  # every 4th kill is a preemption notice
    proc.send_signal(sig)
    proc.communicate()
    event = {"kill": len(log) + 1, **event, "signal": sig.name}
    corrupted = 0
    if rng.random() < corrupt_p and (what := _damage(root, rng)) is not None:
        event["corrupted"], corrupted = what, 1
    log.append(event)
    print(f"  {event}", flush=True)
    return corrupted


def _finish(cmd: list[str]) -> None:
    out = _run(cmd)
    if out.returncode:
        raise RuntimeError(f"{cmd[2]} failed (exit {out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")


def _popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _params(workdir: pathlib.Path):
    from glore_jax.models import checkpoints
    return checkpoints.load_model(str(workdir / "model"))[1]


def _max_diff(a, b) -> float:
    import jax
    import numpy as np
    a, b = jax.device_get((a, b))
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def train_part(tmp: pathlib.Path, rng: random.Random, points: int, steps: int) -> dict:
    """Kills at `points` distinct random steps (each after the run has logged that step), then finishes."""
    ref, faulty = tmp / "train_ref", tmp / "train_faulty"
    t0 = time.perf_counter()
    _finish(_train_cmd(ref, steps))
    clean_s = time.perf_counter() - t0
    log: list = []
    corruptions = 0
    for target in sorted(rng.sample(range(2, steps), points)):
        proc = _popen(_train_cmd(faulty, steps))
        while _last_step(faulty / "metrics.jsonl") < target and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None:
            raise RuntimeError(f"training exited before step {target}: {proc.communicate()[0][-3000:]}")
        corruptions += _kill(proc, rng, faulty, 0.35, log, {"at_step": _last_step(faulty / "metrics.jsonl")})
    _finish(_train_cmd(faulty, steps))
    diff = _max_diff(_params(ref), _params(faulty))
    aside = faulty / "checkpoints_corrupt"
    return {"points": len(log), "kills": len(log), "corruptions": corruptions, "steps": steps, "clean_run_s": clean_s,
            "max_param_diff": diff, "mismatches": int(diff > 1e-5),
            "steps_moved_aside": len(list(aside.iterdir())) if aside.exists() else 0, "events": log}


def _is_training(reference_stage: pathlib.Path) -> bool:
    return (reference_stage / "model").exists()


def pipeline_part(tmp: pathlib.Path, rng: random.Random, points: int) -> dict:
    """Kills once inside each of `points` random stages (in the clean run's order), then finishes."""
    ref, faulty = tmp / "pipe_ref", tmp / "pipe_faulty"
    t0 = time.perf_counter()
    _finish(_pipeline_cmd(ref))
    clean_s = time.perf_counter() - t0
    order = sorted((d for d in (ref / "stages").iterdir() if d.name != "report"),
                   key=lambda d: (d / "done.json").stat().st_mtime)
    targets = sorted(rng.sample(range(len(order)), points))
    log: list = []
    corruptions = 0
    for index in targets:
        stage = faulty / "stages" / order[index].name
        proc = _popen(_pipeline_cmd(faulty))
        while not stage.exists() and proc.poll() is None:
            time.sleep(0.05)
        # A training stage is killed once it has saved a checkpoint (so there is one to damage and fall
        # back from); a sampling stage somewhere in its first seconds.
        deadline = time.time() + 60
        while (not list(stage.glob("checkpoints/[0-9]*")) and not (stage / "done.json").exists()
               and proc.poll() is None and time.time() < deadline and _is_training(order[index])):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.0) if _is_training(order[index]) else rng.uniform(0.5, 4.0))
        if proc.poll() is not None:
            raise RuntimeError(f"the pipeline exited before stage {stage.name}: {proc.communicate()[0][-3000:]}")
        # Damage only the stage that was running: a finished stage's checkpoints are never read again.
        corruptions += _kill(proc, rng, stage, 0.5, log, {"in_stage": stage.name})
    _finish(_pipeline_cmd(faulty))
    a, b = (json.loads((d / "report.json").read_text())["results"] for d in (ref, faulty))
    differ = sorted(k for k in set(a) | set(b)
                    if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True))
    return {"points": len(log), "kills": len(log), "corruptions": corruptions, "clean_run_s": clean_s,
            "mismatches": len(differ), "differing_results": differ, "events": log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer kill points (8 + 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_points", type=int, default=None)
    parser.add_argument("--pipeline_points", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "faults.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train_points = args.train_points or (8 if args.quick else 16)
    pipeline_points = args.pipeline_points or (4 if args.quick else 6)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="glore_faults_"))
    try:
        print(f"training: {train_points} kill points", flush=True)
        train = train_part(tmp, rng, train_points, steps=120)
        print(f"pipeline: {pipeline_points} kill points", flush=True)
        pipe = pipeline_part(tmp, rng, pipeline_points)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {**cpu_info(), "seed": args.seed, "training": train, "pipeline": pipe,
              "points": train["points"] + pipe["points"], "corruptions": train["corruptions"] + pipe["corruptions"],
              "mismatches": train["mismatches"] + pipe["mismatches"]}
    summary = {k: result[k] for k in ("points", "corruptions", "mismatches")}
    print(json.dumps({"cpu": result["cpu"], **summary,
                      "training": {k: train[k] for k in ("points", "corruptions", "steps_moved_aside", "max_param_diff")},
                      "pipeline": {k: pipe[k] for k in ("points", "corruptions", "differing_results")}}, indent=1))
    save(result, args.out)


if __name__ == "__main__":
    main()
