"""Faults a long job meets: corrupt checkpoints, a second writer, torn files, overrides that cannot apply,
truncation, and a grader fed anything."""

import copy
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from glore_jax import errors, files, trainer
from glore_jax.recipe.workspace import truncation_warnings
from glore_jax.sampling import Generator
from glore_jax.tasks import is_correct
from glore_jax.training.checkpoints import CORRUPT_DIR, Checkpoints
from tests.test_train import _cli, _config, _Crash, _crash_at, _max_diff, _metrics


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != "glore_checksums.json"),
               key=lambda p: p.stat().st_size)


def _zero(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 4: len(data) // 4 + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.fixture(scope="module")
def runs(task_records, tokenizer_path, one_device, tmp_path_factory):
    """A clean 6-step run, and the same run crashed at step 5 (checkpoints at 2 and 4); tests damage copies."""
    root = tmp_path_factory.mktemp("runs")
    c = _config(tokenizer_path, root / "clean", total_steps=6, checkpoint_every=2, log_every=1, max_to_keep=3)
    _, params = trainer.train(c, records=task_records[:24], mesh=one_device)
    c.workdir = str(root / "crashed")
    with pytest.raises(_Crash):
        trainer.train(c, source=_crash_at(5), records=task_records[:24], mesh=one_device)
    return {"params": params, "clean": root / "clean", "crashed": root / "crashed", "config": c}


def _copy(src: pathlib.Path, dst: pathlib.Path, config):
    shutil.copytree(src, dst)
    c = copy.deepcopy(config)
    c.workdir = str(dst)
    return c


@pytest.mark.parametrize("damage", [_zero, _truncate])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_older_step(damage, runs, task_records, one_device,
                                                                    tmp_path, caplog):
    c = _copy(runs["crashed"], tmp_path / "run", runs["config"])
    damage(_largest_file(tmp_path / "run" / "checkpoints" / "4"))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # and the torn line a kill during an append leaves
    _, params = trainer.train(c, records=task_records[:24], mesh=one_device)
    assert "checkpoint step 4" in caplog.text and "corrupt" in caplog.text and "trying the next older" in caplog.text
    # Found by the checksum manifest, before Orbax reads the bytes (whether Orbax notices depends on the file).
    assert ("fails its sha256 check" if damage is _zero else "truncated or overwritten") in caplog.text
    assert [p.name.split("-")[0] for p in (tmp_path / "run" / CORRUPT_DIR).iterdir()] == ["4"]  # kept aside
    assert _max_diff(runs["params"], params) < 1e-5  # the older step resumes exactly
    assert [r["step"] for r in _metrics(tmp_path / "run")] == list(range(1, 7))


def test_no_intact_checkpoint_says_what_to_do(runs, task_records, one_device, tmp_path):
    c = _copy(runs["crashed"], tmp_path / "run", runs["config"])
    for step in ("2", "4"):
        _zero(_largest_file(tmp_path / "run" / "checkpoints" / step))
    with pytest.raises(errors.CheckpointError, match=r"no intact checkpoint.*step 4.*step 2.*start this job over"):
        trainer.train(c, records=task_records[:24], mesh=one_device)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def test_every_saved_step_and_the_model_have_a_verified_manifest(runs, task_records, one_device, tmp_path):
    from glore_jax import checksums
    assert Checkpoints(str(runs["clean"]), max_to_keep=3).all_steps() == [2, 4, 6]
    for step in (2, 4, 6):
        assert checksums.verify(str(runs["clean"] / "checkpoints" / str(step))) is None
    assert checksums.verify(str(runs["clean"] / "model" / "params")) is None
    c = _copy(runs["clean"], tmp_path / "run", runs["config"])
    _zero(_largest_file(tmp_path / "run" / "model" / "params"))
    with pytest.raises(errors.CheckpointError, match="saved model .* is corrupt"):
        trainer.train(c, records=task_records[:24], mesh=one_device)  # a finished workdir loads its model


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    with files.WorkdirLock(tmp_path):
        with pytest.raises(errors.WorkdirLocked, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            files.WorkdirLock(tmp_path).acquire()
    # A lock file naming a process that died (no flock held): taken over, and the takeover logged.
    (tmp_path / files.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then"}))
    with files.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / files.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "stale lock of pid 999999" in caplog.text


def test_a_concurrent_second_trainer_is_refused(task_records, tokenizer_path, tmp_path):
    common = [f"--config.workdir={tmp_path / 'run'}", f"--config.data.tokenizer={tokenizer_path}",
              "--config.data.eval_split=", "--config.train.log_every=1", "--config.train.total_steps=100000",
              "--config.train.checkpoint_every=100000"]
    first = _cli(*common)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    second = _cli(*common)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == errors.EXIT_USER_ERROR, out[-3000:]
    assert f"in use by pid {first.pid}" in out and "Traceback" not in out
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    rows, torn = files.read_jsonl(metrics)  # one writer: every line whole and in order
    assert torn == 0 and [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def test_a_torn_last_line_is_skipped_and_counted_but_earlier_damage_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    rows, torn = files.read_jsonl(tmp_path / "m.jsonl")
    assert torn == 1 and [r["step"] for r in rows] == [1, 2]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{torn\n{"step": 3}\n')
    with pytest.raises(errors.DataError, match="bad.jsonl:2"):  # damage before the last line is not a torn append
        files.read_jsonl(tmp_path / "bad.jsonl")


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "train_done.json"
    files.write_json(target, {"step": 1})

    def boom(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(target, {"step": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["train_done.json"]  # no temp file left behind


def test_shape_overrides_that_cannot_apply_are_errors(runs, task_records, tokenizer_path, one_device, tmp_path):
    # Under init_from the checkpoint decides the shapes.
    d = _config(tokenizer_path, tmp_path / "child", total_steps=2)
    d.init_from = str(runs["clean"])
    d.model.num_layers = 7
    with pytest.raises(errors.ConfigError, match=r"model.num_layers=7 cannot apply.*init_from"):
        trainer.train(d, records=task_records[:24], mesh=one_device)
    assert not (tmp_path / "child" / "config.json").exists()  # never recorded as applied
    # On resume the checkpoint decides them too.
    e = _copy(runs["crashed"], tmp_path / "resumed", runs["config"])
    before = (tmp_path / "resumed" / "config.json").read_text()
    e.model.embed_dim = 48
    with pytest.raises(errors.ConfigError, match=r"model.embed_dim=48 cannot apply.*checkpoint at step 4"):
        trainer.train(e, records=task_records[:24], mesh=one_device)
    assert (tmp_path / "resumed" / "config.json").read_text() == before


def test_a_batch_that_does_not_divide_over_the_mesh_names_the_knobs(task_records, tokenizer_path, tmp_path):
    c = _config(tokenizer_path, tmp_path, total_steps=2, batch_size=12)
    with pytest.raises(errors.ConfigError, match=r"train.batch_size 12 .* 8 devices .* multiple of 8"):
        trainer.train(c, records=task_records[:24])  # the 8-device test mesh


def test_truncation_is_counted_and_warned(task_records, tokenizer_path, one_device, tmp_path):
    c = _config(tokenizer_path, tmp_path, total_steps=2, checkpoint_every=2)
    c.data.max_len = 24
    trainer.train(c, records=task_records[:24], mesh=one_device)
    data = trainer.done_info(str(tmp_path))["data"]
    assert data["examples"] == 16 and data["prompt_truncated"] + data["target_truncated"] > 0
    counts = {"train_examples": data["examples"], "train_prompts_cut": data["prompt_truncated"],
              "train_targets_cut": data["target_truncated"], "prompts": 200, "prompts_cut": 2}
    warnings = truncation_warnings(counts)
    assert any("training" in w for w in warnings) and not any("sampled prompts" in w for w in warnings)  # 1% is not over 1%
    assert truncation_warnings({"prompts": 200, "prompts_cut": 3}) == [
        "3 of 200 sampled prompts cut to glore.max_prompt_len (1.5%)"]


def test_generator_counts_cut_prompts_and_unfinished_completions(one_device):
    from glore_jax.models import init_params, preset
    cfg = preset("tiny", vocab_size=128)
    gen = Generator(cfg, init_params(cfg, jax.random.key(0), one_device), max_new=3, mesh=one_device, rows=4,
                    max_prompt_len=8)
    out = gen.generate([[1] + [5] * 20, [1, 5, 6]], k=2)  # no stop condition: every completion runs to max_new
    assert sum(not c.stopped for row in out for c in row) == 4
    assert gen.counts() == {"prompts": 2, "prompts_cut": 1, "completions": 4, "completions_at_limit": 4}


@pytest.mark.parametrize("solution, gold, expected", [
    ("#### 5.0001", "5", False), ("#### 5", "5.0001", False), ("#### 0.30000000000000004", "0.3", True),
    ("#### " + repr(0.1 + 0.2), "0.3", True), ("#### 192000001.0", "192000000", False), ("#### 10/3", "3.3333333333", True),
    ("#### 5", 5, True), ("#### 5", 5.0, True), ("#### 5", None, False), ("#### 5", ["5"], False), (None, 5, False),
    (12, "12", False), ("#### 1e999999", "1", False), ("#### 7", float("nan"), False), ("#### 7", True, False),
])
def test_the_grader_never_raises_and_is_not_loose(solution, gold, expected):
    assert is_correct(solution, gold) is expected


def test_user_errors_end_in_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-c", "from glore_jax import errors\n"
                          "errors.run_cli(lambda: (_ for _ in ()).throw(errors.DataError('f.jsonl:3: bad')), "
                          "verbose=False)"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == "error: f.jsonl:3: bad"
    bug = subprocess.run([sys.executable, "-c", "from glore_jax import errors\n"
                          "errors.run_cli(lambda: 1 / 0, verbose=False)"], capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr  # a bug keeps its traceback
