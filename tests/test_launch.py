"""launch/tpu_pod.sh, without a TPU or a real gcloud.

The dry run's plan (the ordered command kinds for a 2-worker pod, quoting of training args, --spot
only when asked, nothing executed), bad usage (exit 2, one `error:` line), and the preemption loop
run for real against a fake `gcloud` on PATH: the fake executes the remote training command with
bash, where a fake venv python records its argv and exits as each test's plan says.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_pod.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

POD = ["--name", "glore-test", "--zone", "us-east5-a", "--accelerator", "v5p-16"]
# Spaces, quotes, $ and a glob: each must reach the trainer as exactly one, unchanged argument.
TRAIN = ["--config=configs/smoke.py:sorm", "--config.workdir=/mnt/a b",
         "--config.train.note=it's \"quoted\" $HOME *"]

# The fake gcloud: logs its argv; `describe` answers the next state from FAKE_STATES (ACTIVE when
# none are left); `ssh --command=...train...` runs that command with bash in the fake home, as a
# worker's login shell would; everything else succeeds. With FAKE_GCLOUD_FORBID it only logs and
# fails, for the dry runs, which must not call it at all.
FAKE_GCLOUD = """\
#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_GCLOUD_FORBID"):
    sys.exit(97)
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    path = os.environ["FAKE_STATES"]
    states = open(path).read().split()
    print(states[0] if states else "ACTIVE")
    open(path, "w").write("\\n".join(states[1:]))
elif args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print(2)
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = next(a[len("--command="):] for a in args if a.startswith("--command="))
    if "glore_jax.train" in command:
        sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["HOME"]).returncode)
"""

# The fake trainer (HOME/glore_jax/.venv/bin/python): records argv, cwd and GLORE_DISTRIBUTED,
# then behaves as the next entry of FAKE_RUN_PLAN says: an exit code, or "sigterm" (the real
# trainer's preemption path: the log line, then exit 0).
FAKE_PYTHON = """\
#!{python}
import json, os, sys
runs = os.environ["FAKE_RUNS"]
with open(runs, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                        "distributed": os.environ.get("GLORE_DISTRIBUTED")}}) + "\\n")
n = len(open(runs).read().splitlines())
plan = os.environ["FAKE_RUN_PLAN"].split(",")
step = plan[min(n, len(plan)) - 1]
if step == "sigterm":
    print("W1130 trainer: SIGTERM: saved a checkpoint at step 3 of 10 in /mnt/a b; exiting, rerun to resume",
          file=sys.stderr)
    sys.exit(0)
sys.exit(int(step))
"""


@pytest.fixture
def fake(tmp_path):
    """A PATH whose gcloud is the fake, a fake worker home with the fake trainer, and log paths."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    venv_bin = home / "glore_jax" / ".venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    for path, text in ((bin_dir / "gcloud", FAKE_GCLOUD), (venv_bin / "python", FAKE_PYTHON)):
        path.write_text(text.format(python=sys.executable))
        path.chmod(0o755)
    (tmp_path / "states").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home),
           "TMPDIR": str(tmp_path / "tmp"), "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"),
           "FAKE_STATES": str(tmp_path / "states"), "FAKE_RUNS": str(tmp_path / "runs.log"),
           "FAKE_RUN_PLAN": "0"}
    (tmp_path / "tmp").mkdir()
    return tmp_path, env


def launch(fake, *args, forbid=False, **env_overrides):
    tmp_path, env = fake
    env = {**env, **env_overrides}
    if forbid:
        env["FAKE_GCLOUD_FORBID"] = "1"
    return subprocess.run([BASH, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def gcloud_calls(tmp_path):
    log = tmp_path / "gcloud.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def trainer_runs(tmp_path):
    log = tmp_path / "runs.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def option(argv, name):
    return next(a[len(name) + 1:] for a in argv if a.startswith(name + "="))


def kind(argv):
    """A dry-run command's kind, e.g. 'qr create', 'ssh run', 'scp worker=1'."""
    if argv[0] != "gcloud":
        return f"{argv[0]} {argv[3] if argv[0] == 'git' else ''}".strip()  # git -C ROOT archive
    group, verb = argv[3], argv[4]
    if group == "queued-resources":
        return f"qr {verb}"
    if verb == "ssh":
        return "ssh run" if "glore_jax.train" in option(argv, "--command") else "ssh install"
    return f"scp worker={option(argv, '--worker')}"


def plan(stdout):
    lines = stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines]


def remote_train_args(command):
    """The words the worker's shell passes to glore_jax.train, parsed as a shell would."""
    words = shlex.split(command)
    start = words.index(".venv/bin/python") + 1
    assert words[start:start + 2] == ["-m", "glore_jax.train"]
    start += 2
    return words[start:words.index(")", start)]


def test_dry_run_all_two_workers_plan(fake):
    tmp_path, _ = fake
    r = launch(fake, "--dry_run", "all", *POD, "--workers", "2", "--", *TRAIN, forbid=True)
    assert r.returncode == 0, r.stderr
    cmds = plan(r.stdout)
    assert [kind(c) for c in cmds] == [
        "qr create", "qr describe",                       # request, then wait for ACTIVE
        "git archive", "scp worker=all", "ssh install",   # ship HEAD, venv + pip on every worker
        "ssh run", "qr describe",                         # train everywhere; finished or preempted?
        "mkdir", "scp worker=0", "scp worker=1",          # each worker's logs
        "qr delete",
    ]
    create = cmds[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "glore-test-qr"]
    assert {"--node-id=glore-test", "--zone=us-east5-a", "--accelerator-type=v5p-16",
            "--runtime-version=tpu-ubuntu2204-base"} <= set(create)
    assert "--spot" not in create
    assert option(cmds[1], "--format") == "value(state.state)"
    install = option(cmds[4], "--command")
    assert "python3.11 -m venv .venv" in install and ".venv/bin/pip install -q -e '.[tpu]'" in install
    run = cmds[5]
    assert option(run, "--worker") == "all" and run[5] == "glore-test"
    command = option(run, "--command")
    assert "GLORE_DISTRIBUTED=1 exec .venv/bin/python -m glore_jax.train" in command
    assert remote_train_args(command) == TRAIN
    assert cmds[-1][-2:] == ["--force", "--quiet"]
    # Nothing ran: gcloud never called, no tarball written, no log folder made.
    assert gcloud_calls(tmp_path) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "tpu_logs").exists()


def test_dry_run_spot_only_when_asked_and_project(fake):
    r = launch(fake, "--dry-run", "create", *POD, "--spot", "--project=my-proj", forbid=True)
    assert r.returncode == 0, r.stderr
    cmds = plan(r.stdout)
    assert [kind(c) for c in cmds] == ["qr create", "qr describe"]
    assert "--spot" in cmds[0] and all("--project=my-proj" in c for c in cmds)
    r = launch(fake, "--dry_run", "resume", *POD, "--", *TRAIN, forbid=True)
    assert r.returncode == 0, r.stderr
    cmds = plan(r.stdout)
    assert [kind(c) for c in cmds] == ["qr describe", "ssh run", "qr describe"]
    assert not any("--spot" in c for c in cmds)
    assert gcloud_calls(fake[0]) == []


@pytest.mark.parametrize("args, message", [
    ([], "missing subcommand"),
    (["frobnicate", *POD], "unknown subcommand 'frobnicate'"),
    (["create", "--zone", "z", "--accelerator", "v5p-16"], "missing --name"),
    (["create", "--name", "Bad_Name", "--zone", "z", "--accelerator", "v5p-16"], "--name 'Bad_Name'"),
    (["create", "--name", "x", "--zone", "z"], "missing --accelerator"),
    (["create", *POD, "--bogus"], "unknown option --bogus"),
    (["create", *POD, "--max_restarts", "many"], "--max_restarts must be a whole number"),
    (["run", *POD], "missing --config"),
    (["run", *POD, "--", "--config=c.py"], "missing --config.workdir"),
    (["run", *POD, "--", "--config=c.py", "--config.workdir=gs://b/w"], "not a gs:// URL"),
    (["run", *POD, "--", "--config=c.py", "--config.workdir=rel/w"], "absolute path"),
    (["delete", *POD, "--", "--config=c.py"], "only go with run, resume or all"),
    (["setup", *POD, "--repo_dir", "../x"], "--repo_dir"),
    (["create", *POD, "--spot=yes"], "--spot takes no value"),
    (["glore-v4-64", "us-central2-b", "configs/x.py"], "the old 'NAME ZONE CONFIG ARGS' form"),
])
def test_bad_usage_exits_2_with_one_error_line(fake, args, message):
    r = launch(fake, "--dry_run", *args, forbid=True)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert gcloud_calls(fake[0]) == []


def test_help_is_the_header(fake):
    r = launch(fake, "--help")
    assert r.returncode == 0 and "Subcommands:" in r.stdout and "queued resource" in r.stdout


def ssh_runs(calls):
    return [c for c in calls if c[3] == "ssh" and "glore_jax.train" in option(c, "--command")]


def describes(calls):
    return [c for c in calls if c[2:4] == ["queued-resources", "describe"]]


@pytest.mark.parametrize("first", ["1", "sigterm"])
def test_resume_retries_once_after_preemption(fake, first):
    """First run: exit 1 (the ssh died with the VM) or the trainer's SIGTERM path (log line, exit 0);
    second run: exit 0. The loop re-runs exactly once with the same args, then stops."""
    tmp_path, _ = fake
    r = launch(fake, "resume", *POD, "--retry_sleep_s", "0", "--", *TRAIN, FAKE_RUN_PLAN=f"{first},0")
    assert r.returncode == 0, r.stderr
    runs = trainer_runs(tmp_path)
    assert len(runs) == 2
    for run in runs:
        assert run["argv"] == ["-m", "glore_jax.train", *TRAIN]  # quoting survived a real shell
        assert run["distributed"] == "1"
        assert pathlib.Path(run["cwd"]) == tmp_path / "home" / "glore_jax"
    calls = gcloud_calls(tmp_path)
    assert len(ssh_runs(calls)) == 2
    assert len(describes(calls)) == 3  # before the first run, before the re-run, after the last run
    assert not any(c[3] in ("create", "delete") for c in calls)  # the slice stayed ACTIVE
    assert "restart 1 of 10" in r.stderr and "training finished" in r.stderr
    assert len(list((tmp_path / "home" / "glore_logs").glob("train-*.log"))) >= 1


def test_resume_recreates_a_suspended_slice(fake):
    """After a failed run the queued resource reports SUSPENDED (spot capacity reclaimed): delete,
    create, wait for ACTIVE, set the new workers up, run again."""
    tmp_path, env = fake
    pathlib.Path(env["FAKE_STATES"]).write_text("ACTIVE\nSUSPENDED\n")
    r = launch(fake, "resume", *POD, "--spot", "--retry_sleep_s", "0", "--poll_s", "0", "--", *TRAIN,
               FAKE_RUN_PLAN="1,0")
    assert r.returncode == 0, r.stderr
    calls = gcloud_calls(tmp_path)
    kinds = [f"{c[2]} {c[3]}" if c[2] == "queued-resources" else
             f"{c[3]} {'run' if c in ssh_runs(calls) else 'other'}" for c in calls]
    assert kinds == ["queued-resources describe", "ssh run", "queued-resources describe",
                     "queued-resources delete", "queued-resources create", "queued-resources describe",
                     "scp other", "ssh other", "ssh run", "queued-resources describe"]
    assert "--spot" in calls[4]
    assert len(trainer_runs(tmp_path)) == 2
    assert list((tmp_path / "tmp").iterdir()) == []  # the shipped tarball was cleaned up


def test_resume_gives_up_after_max_restarts(fake):
    tmp_path, _ = fake
    r = launch(fake, "resume", *POD, "--workers", "2", "--max_restarts", "2", "--retry_sleep_s", "0",
               "--", *TRAIN, FAKE_RUN_PLAN="1")
    assert r.returncode == 1
    assert len(trainer_runs(tmp_path)) == 3
    assert "giving up after 2 restarts" in r.stderr and r.stderr.splitlines()[-1].startswith("error: ")
    logs = [c for c in gcloud_calls(tmp_path) if c[3] == "scp"]
    assert [option(c, "--worker") for c in logs] == ["0", "1"]  # each worker's logs fetched


def test_bad_config_is_not_retried_and_run_never_retries(fake):
    tmp_path, _ = fake
    r = launch(fake, "resume", *POD, "--retry_sleep_s", "0", "--", *TRAIN, FAKE_RUN_PLAN="2")
    assert r.returncode == 1 and "not retrying" in r.stderr
    assert len(trainer_runs(tmp_path)) == 1
    r = launch(fake, "run", *POD, "--", *TRAIN, FAKE_RUN_PLAN="1")
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == "error: the run exited 1"
    assert len(trainer_runs(tmp_path)) == 2
