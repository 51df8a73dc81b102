"""Where training metrics go: `metrics.jsonl`, TensorBoard events, and a progress bar or log lines.

Only process 0 writes. On resume, jsonl lines past the restored step are
dropped: they describe steps that will be run again; so is a torn last line
that a kill left mid-append (`files.read_jsonl`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import jax

from glore_jax import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak per chip, TFLOP/s; MFU is an estimate, so the nearest
# published figure is good enough. Keys are matched against device_kind.
# v5e's device_kind is "TPU v5 lite", v5p's plain "TPU v5": the lite key must come first.
_PEAK_TFLOPS = (("v6", 918.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v5", 459.0), ("v4", 275.0), ("v3", 123.0),
                ("h200", 989.0), ("h100", 989.0), ("a100", 312.0))
# bf16 with f32 accumulation, measured on the 2-core development machine;
# CPU MFU is only a sanity check.
_CPU_TFLOPS = 1.4


def peak_tflops(configured: float, device: jax.Device | None = None) -> float:
    """Per-device peak: the configured value, else a guess from the device kind."""
    if configured > 0:
        return configured
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for key, value in _PEAK_TFLOPS:
        if key in kind:
            return value
    return _CPU_TFLOPS if device.platform == "cpu" else 100.0


def setup_logging() -> None:
    """INFO-level progress lines, without Orbax's per-save detail or TFDS's config notices."""
    from absl import logging
    logging.set_verbosity(logging.INFO)
    noisy = ("/orbax/", "/tensorflow_datasets/")
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= 40 or not any(n in r.pathname for n in noisy))


class MetricsWriter:
    def __init__(self, workdir: str, *, resume_step: int):
        self.enabled = jax.process_index() == 0
        self._path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not self.enabled:
            return
        if os.path.exists(self._path):
            rows, torn = files.read_jsonl(self._path)
            if torn:
                logging.warning("%s: dropped a torn last line (a kill cut its append)", self._path)
            files.write_atomic(self._path, "".join(json.dumps(r) + "\n" for r in rows
                                                   if r.get("step", 0) <= resume_step))
        from tensorboardX import SummaryWriter  # heavy import, only on the writing process
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        files.append_line(self._path, json.dumps(row))
        for key, value in row.items():
            if key != "step":
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (batch logs stay readable)."""

    def __init__(self, start: int, total: int, *, desc: str):
        self._bar = None
        if jax.process_index() == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
        self._desc = desc

    def update(self, step: int, metrics: dict[str, float] | None) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if metrics:
                self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        elif metrics and jax.process_index() == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
            logging.info("%s step %d: %s", self._desc, step, shown)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
