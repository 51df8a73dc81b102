"""Everything around the train steps: metrics and throughput, eval timing, SIGTERM, checkpoints, the end.

`Session` keeps the loop in `trainer` a few lines long. Its rules:
  - metrics go to `metrics.jsonl` and TensorBoard every `log_every` steps;
    tokens/s, MFU (on non-pad tokens) and the non-pad share are measured over
    the steps since the last log line, the first (compiling) step excluded;
  - evaluators run every `eval_every` steps and at the end, on the same row;
    with `stop_metric` set, the first eval where it reaches `stop_at` ends the
    run there (saved, marked done), so `total_steps` is a cap;
  - a non-finite step raises `NonFiniteLoss` before anything is saved;
  - a checkpoint every `checkpoint_every` steps, at the end, and on SIGTERM,
    after which `Preempted` is raised so the caller exits and reruns later.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

from glore_jax import distributed, files
from glore_jax.errors import ConfigError
from glore_jax.models import checkpoints as model_checkpoints
from glore_jax.training import metrics as metrics_lib, state as state_lib
from glore_jax.training.checkpoints import MODEL_DIR, Checkpoints

DONE_FILE = "train_done.json"


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint at `step`; rerun to resume."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step}; rerun with the same workdir to resume")
        self.step = step


class NonFiniteLoss(FloatingPointError):
    """A step produced a NaN/Inf loss or gradient; its update was discarded and nothing was saved."""


class _StopSignal:
    """Turns SIGTERM into a flag the loop polls; multi-host runs agree on the step through JAX."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # Each host gets SIGTERM at a different step; JAX's preemption
            # service picks one step at which all hosts save together.
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Session:
    """One training job's side effects, from its first step (`start`) to its saved model."""

    def __init__(self, run, start: int):
        self.run, self.t, self.start = run, run.exp.train, start
        workdir = run.exp.workdir
        self.info = {"model_config": json.loads(run.model.to_json()), "objective": run.objective.name,
                     "prompt_format": run.prompt_format}
        self.saved_frozen = tuple(s.name for s in run.objective.frozen if s.checkpoint)
        if jax.process_index() == 0:
            files.write_atomic(os.path.join(workdir, "config.json"), run.exp.source_json)
        self.ckpts = Checkpoints(workdir, max_to_keep=self.t.max_to_keep)
        self.writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
        self.progress = metrics_lib.Progress(start, self.t.total_steps,
                                             desc=f"{run.objective.name}:{os.path.basename(workdir)}")
        self.stop = _StopSignal()
        self.flops_per_token = run.model.flops_per_token(run.exp.data.max_len)
        self.peak = metrics_lib.peak_tflops(self.t.peak_tflops) * 1e12 * run.mesh.size
        self.last_saved = start or None
        self.started = time.perf_counter()  # this process's share of the job (a resumed run counts from here)
        self.stopping = False
        self.stopped_early: dict | None = None  # {step, metric, value} once stop_metric reached stop_at
        self._reset_window()

    def _reset_window(self) -> None:
        self.window: dict[str, float] = {}
        self.window_start, self.window_steps = time.perf_counter(), 0

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.stop.restore()
        self.progress.close()
        self.writer.close()
        self.ckpts.wait()
        self.ckpts.close()

    def eval_due(self, step: int) -> bool:
        return bool(self.t.eval_every and step % self.t.eval_every == 0) or step == self.t.total_steps

    def record(self, step: int, metrics: dict[str, Any], padded_tokens: int,
               evaluate: Callable[[], dict[str, float]],
               source_metrics: Callable[[], dict[str, float]] | None = None) -> None:
        """Checks, accumulates and (when due) logs step `step`'s metrics, with evals on the same row.

        `source_metrics()` is the experience source's own figures since its last call (an on-policy
        source's sampling time and tokens/s); with `sample_seconds` among them, the train step's own
        throughput is logged apart from sampling as `train_tokens_per_sec`.
        """
        if not metrics.pop("finite"):
            kept = f"checkpoint at step {self.last_saved}" if self.last_saved is not None else "no checkpoint yet"
            raise NonFiniteLoss(
                f"non-finite loss {metrics['loss']} or grad norm {metrics['grad_norm']} at step {step}; the update "
                f"was discarded and nothing was saved ({kept} is the last good state)")
        if step == self.start + 1:  # the first step compiles; keep it out of the throughput window
            self._reset_window()
            if source_metrics is not None:
                source_metrics()
        else:
            self.window_steps += 1
            for k, v in {**metrics, "padded": padded_tokens}.items():
                self.window[k] = self.window.get(k, 0.0) + float(v)
        logged = None
        if step % self.t.log_every == 0 or step == self.t.total_steps:
            logged = {k: float(v) for k, v in metrics.items() if k != "tokens"}
            elapsed = time.perf_counter() - self.window_start
            if self.window_steps and elapsed > 0:
                logged["tokens_per_sec"] = self.window["tokens"] / elapsed
                logged["steps_per_sec"] = self.window_steps / elapsed
                # Non-pad tokens only: pad positions cost compute but do no work.
                logged["mfu"] = self.flops_per_token * self.window["tokens"] / elapsed / self.peak
                logged["nonpad_fraction"] = self.window["tokens"] / max(self.window["padded"], 1.0)
                logged["peak_rss_gb"] = peak_rss_gb()
                if source_metrics is not None:
                    extra = source_metrics()
                    logged.update(extra)
                    if "sample_seconds" in extra:
                        logged["train_tokens_per_sec"] = self.window["tokens"] / max(
                            elapsed - extra["sample_seconds"], 1e-9)
            if "reward_sq" in logged:  # a (sum, count) pair gives means; the std comes from E[r^2] - E[r]^2
                logged["reward_std"] = max(logged.pop("reward_sq") - logged["reward"] ** 2, 0.0) ** 0.5
            self._reset_window()
        if self.eval_due(step):
            evals = evaluate()
            self._check_stop(step, evals)
            logged = {**(logged or {}), **evals}
        if logged is not None:
            self.writer.write(step, logged)
        self.progress.update(step, logged)
        self.stopping = self.stop.should_stop(step)

    def _check_stop(self, step: int, evals: dict[str, float]) -> None:
        if not self.t.stop_metric:
            return
        if self.t.stop_metric not in evals:
            raise ConfigError(f"train.stop_metric {self.t.stop_metric!r} is not among this run's evals: "
                              f"{sorted(evals)}")
        if evals[self.t.stop_metric] >= self.t.stop_at:
            self.stopped_early = {"step": step, "metric": self.t.stop_metric, "value": evals[self.t.stop_metric]}
            logging.info("%s: %s = %.4f reached %s at step %d of %d; ending the run here", self.run.exp.workdir,
                         self.t.stop_metric, evals[self.t.stop_metric], self.t.stop_at, step, self.t.total_steps)

    def stops_at_resume(self, step: int, evaluate: Callable[[], dict[str, float]]) -> bool:
        """A run killed after it decided to stop but before its model was saved resumes at that step's
        checkpoint: the same eval on the same params decides again, rather than training on."""
        if self.t.stop_metric and 0 < step < self.t.total_steps and self.eval_due(step):
            self._check_stop(step, evaluate())
        return self.stopped_early is not None

    def maybe_checkpoint(self, step: int, state, source_state: dict) -> None:
        if (step % self.t.checkpoint_every == 0 or step == self.t.total_steps or self.stopping
                or self.stopped_early):
            self.last_saved = self.ckpts.save(state, source_state, self.info, frozen=self.saved_frozen)
        if self.stopping:
            self.ckpts.wait()
            logging.warning("SIGTERM: saved a checkpoint at step %d of %d in %s; exiting, rerun to resume",
                            step, self.t.total_steps, self.run.exp.workdir)
            raise Preempted(step)

    def finish(self, state, data_stats: dict[str, int] | None) -> tuple[Any, Any]:
        """Saves the final model and the done marker (with what the data cut); returns (model config, params)."""
        self.ckpts.wait()
        workdir = self.run.exp.workdir
        params = state_lib.model_params(state)
        model_checkpoints.save_model(os.path.join(workdir, MODEL_DIR), self.run.model, params)
        stats = distributed.sum_counts(dict(data_stats or {}))  # each process counted only its own rows
        if stats.get("examples"):
            limits = stats.get("limits", {})  # a source may cut at its own knobs (rl.max_new_tokens)
            for key in ("prompt_truncated", "target_truncated"):
                if stats.get(key, 0) / stats["examples"] > 0.01:
                    logging.warning("%s: %d of %d training examples had their %s cut to %s", workdir, stats[key],
                                    stats["examples"], key.split("_")[0],
                                    limits.get(key, f"data.max_len={self.run.exp.data.max_len}"))
        if jax.process_index() == 0:
            step = self.stopped_early["step"] if self.stopped_early else self.t.total_steps
            files.write_json(os.path.join(workdir, DONE_FILE),
                             {"step": step, "objective": self.run.objective.name, "data": stats,
                              "stopped_early": self.stopped_early,
                              "peak_rss_gb": peak_rss_gb(), "wall_seconds": time.perf_counter() - self.started})
        return self.run.model, params
