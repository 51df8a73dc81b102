"""The GLoRe pipeline end to end on the smoke config: report keys, kill-and-resume, no rework."""

import json
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = ("greedy", "best_of_3", "greedy_plus_2", "global", "local", "glore", "oracle", "oracle_any")
REQUIRED = ROWS + tuple(f"{m}_{k}" for m in ("orm", "sorm") for k in (
    "step_accuracy", "final_accuracy", "step_auroc", "step_balanced_accuracy", "final_auroc", "where_accuracy",
    "where_threshold", "where_accuracy_at_half")) + (
    "sorm_label_precision", "sorm_label_recall", "refine_rate", "orm_threshold", "refine_pairs_by_source")


def _check_report(report):
    results = report["results"]
    for key in REQUIRED:
        assert key in results, key
    for row in ROWS:
        lo, hi = results["ci95"][row]
        assert 0 <= lo <= results[row] <= hi <= 1, row
        assert 0 <= results["p_vs_greedy"][row] <= 1, row
    assert report["num_test"] == report["config"]["glore"]["test_questions"] and "seed" in report
    assert set(report["timings"]) >= {"policy", "calibrate", "inference", "value_eval"}
    assert set(report["compile_timings"]) == set(report["timings"])
    # Each policy stage's summary says how many steps it trained (the smoke config sets no stop target).
    stages = report["config"]["stages"]
    assert report["policy_training"]["policy"] == {"steps": stages["policy"]["total_steps"], "stopped_early": None}
    assert report["policy_training"]["ei_1"]["steps"] == stages["ei"]["total_steps"]
    gap = report["results"]["sorm_minus_orm_step_auroc"]
    assert gap["ci95"][0] <= gap["diff"] <= gap["ci95"][1] or gap["resamples"] == 0
    # What each stage cut to a length limit is counted: sampled prompts, completions, training examples.
    per_stage = report["truncation"]["per_stage"]
    assert per_stage["orm_samples"]["prompts"] > 0 and per_stage["orm_samples"]["completions"] > 0
    assert per_stage["policy"]["train_examples"] > 0 and per_stage["inference"]["scored"] > 0
    assert isinstance(report["truncation"]["warnings"], list)


def _pipeline(workdir, **kw):
    return subprocess.Popen([sys.executable, "-m", "glore_jax.pipeline", "--config=configs/smoke.py",
                             f"--config.workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _files(root):
    # LOCK is the workdir lock (glore_jax.files.WorkdirLock): every run takes it, so it is rewritten.
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in pathlib.Path(root).rglob("*")
            if p.is_file() and p.name != "LOCK"}


def test_smoke_pipeline_resumes_after_a_kill_and_reruns_do_no_work(tmp_path):
    wd = tmp_path / "run"
    stage = wd / "stages" / "sorm_labels"
    proc = _pipeline(wd)
    deadline = time.time() + 600
    while not (stage / "shard_00001.jsonl").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "the pipeline never reached the SORM labelling stage"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-stage, no chance to clean up
    proc.wait()
    assert not (stage / "done.json").exists()
    assert not list(wd.rglob("*.tmp")), "a killed stage left a half-written file"
    before = {name: m for name, m in _files(stage).items() if name.startswith("shard_")}
    for name in before:  # every shard on disk is complete JSON lines
        for line in (stage / name).read_text().splitlines():
            json.loads(line)
    earlier = [d for d in ("policy", "ei_1_samples", "ei_1", "orm_samples", "orm")
               if (wd / "stages" / d / "done.json").exists()]
    assert len(earlier) == 5

    out, _ = _pipeline(wd).communicate(timeout=900)
    assert "report: done" in out, out[-3000:]
    for d in earlier:
        assert f"{d}: already done, skipped" in out
    after = _files(stage)
    assert all(after[name] == m for name, m in before.items()), "finished shards were recomputed"
    report = json.loads((wd / "report.json").read_text())
    _check_report(report)
    # The ORM gate is calibrated on validation questions carved from the train split: none is a test
    # question, and none was in the policy's SFT set (the EI records hold the SFT set plus samples).
    val_q, test_q, sft_q = ({json.loads(line)["question"] for line in (wd / "stages" / path).read_text().splitlines()}
                            for path in ("calibrate/val_rows.jsonl", "inference/test_rows.jsonl",
                                         "ei_1_samples/ei_1_records.jsonl"))
    assert len(val_q) == 8 and not val_q & test_q and not val_q & sft_q
    # So are the locator thresholds: `locate` sampled the same validation questions, and the report's
    # where-accuracy read each model at the threshold it chose there.
    located = json.loads((wd / "stages" / "locate" / "done.json").read_text())["result"]
    assert {json.loads(line)["question"] for p in (wd / "stages" / "locate" / "samples").glob("shard_*.jsonl")
            for line in p.read_text().splitlines()} == val_q and located["calibrated"]
    assert all(report["results"][f"{m}_where_threshold"] == located[m] for m in ("orm", "sorm"))
    assert report["results"]["orm_threshold"] == json.loads(
        (wd / "stages" / "calibrate" / "done.json").read_text())["result"]["orm_threshold"]
    assert (wd / "report.md").exists() and (wd / "step_accuracy.png").exists() and (wd / "calibration.png").exists()
    # every stage read one dataset and one tokenizer, built once under <workdir>/data
    assert len(list((wd / "data" / "tokenizers").glob("*.model"))) == 1
    assert not list((wd / "stages").glob("*/data")), "a stage built its own data dir"
    # The SORM's train step is the ORM's program (the smoke config gives both the same schedule): the resumed
    # process loaded the one the killed process compiled from the compile cache (glore.compile_cache; the
    # tests' own cache here, see conftest) instead of compiling it again.
    assert json.loads((wd / "stages" / "sorm" / "done.json").read_text())["compile_cache_hits"] >= 1
    labels = [json.loads(line) for line in (stage / "sorm_labels.jsonl").read_text().splitlines()]
    assert labels and all(len(r["rollouts"][0]) == 2 for r in labels)  # saved with their K=2 rollouts

    snapshot = _files(wd)
    t0 = time.time()
    out, _ = _pipeline(wd).communicate(timeout=600)
    assert out.count("already done, skipped") == 14, out[-3000:]
    assert _files(wd) == snapshot, "a finished pipeline wrote files on re-run"
    assert time.time() - t0 < 120



def test_gsm8k_pipeline_uses_rollout_labels_as_step_truth(tmp_path, shared_dir):
    wd = tmp_path / "gsm8k"
    proc = subprocess.run(
        [sys.executable, "-m", "glore_jax.pipeline", "--config=configs/smoke.py", f"--config.workdir={wd}",
         "--config.data.task=gsm8k", f"--config.data.manual_dir={shared_dir / 'data' / 'gsm8k'}",
         f"--config.data.tokenizer={shared_dir / 'tokenizers' / 'mistral-7b-v0.1' / 'tokenizer.model'}",
         # What is tested here is where the step truth comes from, not learning: the fewest steps and
         # tokens that run every stage (a 32k vocab makes each step and each sampled token costly).
         *[f"--config.stages.{s}.total_steps=4" for s in ("policy", "ei", "orm", "sorm", "global_refiner",
                                                           "local_refiner")],
         # The paper's two refiners (the smoke config, like the demo, trains one for both).
         "--config.glore.joint_refiner=false",
         # Fixed locator: `locate` would label validation samples by rollouts, the path value_eval takes here.
         "--config.glore.sorm_threshold=0.5",
         "--config.glore.max_new_tokens=24"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((wd / "report.json").read_text())
    assert report["task"] == "gsm8k" and report["step_truth"].startswith("held-out rollout labels")
    _check_report(report)
    # the truth came from rollouts of the test-question samples, saved in the stage
    assert list((wd / "stages" / "value_eval" / "rollouts").glob("shard_*.jsonl"))
    assert (wd / "stages" / "local_refiner" / "done.json").exists() and not (wd / "stages" / "refiner").exists()
