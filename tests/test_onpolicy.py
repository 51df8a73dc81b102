"""On-policy RL in the one loop: `grpo` samples the current policy, steps on a reused batch (rl.mu = 2),
keeps a frozen reference, logs the RL metrics, and resumes exactly after kill -9."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from glore_jax.sharding import make_mesh
from glore_jax.tasks import generate_split
from glore_jax.training.checkpoints import Checkpoints
from tests import onpolicy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generation_eval_runs_in_the_loop(warm_policy):
    """Greedy accuracy on held-out questions, logged on the eval steps beside the training metrics."""
    rows = [r for r in _metrics(pathlib.Path(warm_policy[1])) if "eval_accuracy" in r]
    assert [r["step"] for r in rows] == [75, 150]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows) and "loss" in rows[-1]
    assert rows[-1]["eval_accuracy"] > 0   # 150 SFT steps on one-step sums answer some of them


def _metrics(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _job(workdir, tok, init, steps, objective="grpo"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen([sys.executable, "-m", "tests.onpolicy", f"--workdir={workdir}", f"--init_from={init}",
                             f"--tokenizer={tok}", f"--steps={steps}", f"--objective={objective}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


LOGGED = {"grpo": ("reward_std", "accuracy", "clip_fraction", "entropy", "completion_length", "cut_at_limit",
                    "sample_tokens_per_sec", "train_tokens_per_sec", "peak_rss_gb"),
          "score": ("reward_std", "acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "identical", "kl_t1",
                    "kl_t2", "length_t1", "length_t2", "reward_t1", "sample_tokens_per_sec", "peak_rss_gb")}


@pytest.mark.parametrize("objective", ["grpo", "score"])
def test_rl_logs_its_metrics_and_resumes_exactly_after_kill_9(warm_policy, tmp_path, objective):
    """GRPO, and SCoRe's two-turn episodes (whose reused batch must keep its turn ids across a restart)."""
    tok, policy = warm_policy
    steps = 8
    out, _ = _job(tmp_path / "straight", tok, policy, steps, objective).communicate(timeout=600)
    assert '"finished": 8' in out, out[-3000:]
    straight = _metrics(tmp_path / "straight")
    assert [r["step"] for r in straight] == list(range(1, steps + 1))
    rewards = [r["reward_t1" if objective == "score" else "reward"] for r in straight]
    assert 0 < np.mean(rewards) < 1, rewards      # the group baseline has something to subtract
    assert any(abs(r["loss"]) > 1e-6 for r in straight) and all(r["kl"] == r["kl"] for r in straight)
    assert abs(straight[0]["kl"]) < 1e-6          # step 1 samples the reference itself
    # Step 1 trains the weights that sampled its rollouts: its ratio is 1 up to float32 rounding (the
    # sampling-time and training forwards are separate XLA programs). Step 2 reuses them after an update.
    assert abs(straight[0]["ratio"] - 1.0) < 1e-6 and abs(straight[1]["ratio"] - 1.0) > 1e-5
    for key in LOGGED[objective]:
        assert key in straight[-1], key

    killed = tmp_path / "killed"
    killed_at = kill_after_a_checkpoint(_job(killed, tok, policy, steps, objective), killed)
    assert len(_metrics_or_empty(killed)) < steps and 2 <= killed_at < steps
    out, _ = _job(killed, tok, policy, steps, objective).communicate(timeout=600)
    assert '"finished": 8' in out, out[-3000:]
    resumed = _metrics(killed)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["reward"], a["kl"], a.get("acc_t1")) == (b["loss"], b["reward"], b["kl"], b.get("acc_t1")), (a, b)


def kill_after_a_checkpoint(proc, workdir, rows: int = 5) -> int:
    """kill -9 the job once it has a checkpoint and `rows` metric rows; returns the latest checkpoint step."""
    # Polled cheaply and often: with the tests' compilation cache a step takes a fraction of a second,
    # and opening the checkpoint manager on every poll once let a 6-step job finish between two polls.
    deadline, ckpts = time.time() + 600, pathlib.Path(workdir) / "checkpoints"
    while not (ckpts.is_dir() and any(d.name.isdigit() and (d / "_CHECKPOINT_METADATA").exists()
                                      for d in ckpts.iterdir())) or len(_metrics_or_empty(workdir)) < rows:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return Checkpoints(str(workdir), max_to_keep=2).latest_step()


def _metrics_or_empty(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_rollouts_batch_layout_reuse_and_state(warm_policy):
    """One batch of rollouts: groups contiguous, loss on completion tokens only, reused mu times, and a
    restored source serves the pending batch, then draws what the original would."""
    import types

    from glore_jax.models import checkpoints as model_checkpoints
    from glore_jax.rl.config import RLConfig
    from glore_jax.rl.rollouts import Rollouts
    from glore_jax.tokenizer import Tokenizer
    from glore_jax.training.config import experiment

    tok_path, policy = warm_policy
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model, params = model_checkpoints.load_model(os.path.join(policy, "model"), mesh)
    exp = experiment(onpolicy.config("/tmp/unused", tok_path, policy, 4))
    tok = Tokenizer.load(tok_path)
    run = types.SimpleNamespace(exp=exp, model=model, mesh=mesh, tokenizer=tok)
    cfg = RLConfig(group_size=4, mu=2, max_new_tokens=40, max_prompt_len=64)
    records = list(generate_split(onpolicy.TASK, "train"))
    src = Rollouts(run, cfg, records, seed=3)
    rng = jax.random.key(7)
    first = jax.device_get(src.next(params, 0, rng))
    state = src.state()
    assert "pending" in state and state["served"] == 1
    second = jax.device_get(src.next(params, 1, jax.random.key(8)))  # reused: same rollouts, whatever the rng
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    b = 16
    assert first["tokens"].shape == (b, 64 + 40) and first["old_logprobs"].shape == (b, 64 + 40)
    adv = first["advantages"].reshape(4, 4)
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-4)        # grpo: centred within each group
    for row in range(b):
        n = int(first["segment_ids"][row].sum())
        prompt_len = n - int(first["loss_mask"][row].sum())
        assert first["loss_mask"][row, :prompt_len].sum() == 0 and first["loss_mask"][row, prompt_len:n].all()
        assert first["tokens"][row, prompt_len - 1] == tok.control_id("[SOL]")   # loss starts after the prompt
        assert (first["old_logprobs"][row, prompt_len:n] < 0).all()
    restored = Rollouts(run, cfg, records, seed=3)
    restored.restore(json.loads(json.dumps(state)))   # through JSON, as a checkpoint stores it
    again = jax.device_get(restored.next(params, 1, jax.random.key(8)))
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    third, third_again = (jax.device_get(s.next(params, 2, jax.random.key(9))) for s in (src, restored))
    np.testing.assert_array_equal(third["tokens"], third_again["tokens"])
    assert src.state()["position"] == 8   # two draws of 4 questions
