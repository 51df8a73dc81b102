"""Two processes x 4 CPU devices joined by jax.distributed (gloo) == one process x 8 devices.

One pipeline run per layout, stopped after its first sampling stage: the
policy stage is a training job (per-process Grain rows, multi-process Orbax
checkpoints) and `ei_1_samples` samples with the mesh spanning both
processes. The 2-process run is killed (SIGKILL, both processes) after a
checkpoint and resumed. Tolerance: losses within 1e-5 relative (only the
order of the cross-process reductions differs); samples token-identical.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 60, 10
ARGS = ["--config=configs/smoke.py", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        f"--config.stages.policy.total_steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
        "--config.train.log_every=1", "--config.glore.stop_after=ei_1_samples",
        "--config.glore.train_questions=8", "--config.glore.max_new_tokens=24"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, processes: int, port: int | None = None) -> list[subprocess.Popen]:
    procs = []
    for pid in range(processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
        if processes > 1:
            env.update(GLORE_DISTRIBUTED="1", GLORE_COORDINATOR=f"127.0.0.1:{port}",
                       GLORE_NUM_PROCESSES=str(processes), GLORE_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-m", "glore_jax.pipeline", *ARGS,
                                       f"--config.workdir={workdir}"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def _finish(procs, timeout=300) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "stages" / "policy" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _samples(workdir) -> list[dict]:
    stage = workdir / "stages" / "ei_1_samples"
    return [json.loads(line) for f in sorted(stage.glob("shard_*.jsonl")) for line in f.read_text().splitlines()]


def test_two_processes_train_and_sample_like_one_and_resume_after_a_kill(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _finish(_launch(one, 1))

    port = _free_port()
    procs = _launch(two, 2, port)
    ckpts = two / "stages" / "policy" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts.is_dir() and any(d.name.isdigit() and int(d.name) >= 2 * EVERY for d in ckpts.iterdir())):
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        assert time.time() < deadline, "the 2-process run never saved a checkpoint"
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)  # both hosts lost at once, no chance to save
    for p in procs:
        p.wait()
    assert not (two / "stages" / "policy" / "done.json").exists(), "the kill came too late to test resume"

    outs = _finish(_launch(two, 2, _free_port()))
    resumed = [line for line in outs[0].splitlines() if "resuming" in line]
    assert resumed and f"from step {STEPS}" not in resumed[0], outs[0][-3000:]

    ref, got = _losses(one), _losses(two)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1] - 1.0  # it trained
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    sampled, expected = _samples(two), _samples(one)
    assert len(expected) >= 8 and sampled == expected
    done = json.loads((two / "stages" / "policy" / "train_done.json").read_text())
    assert done["data"]["examples"] == json.loads((one / "stages" / "policy" / "train_done.json").read_text())[
        "data"]["examples"]  # counted over both processes' rows
