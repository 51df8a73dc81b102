"""XLA compile time: counted, and not paid twice for one program in one run.

Why this exists: the recipe's stages each build their own jitted train step
and sampler, and JAX's in-memory cache is keyed on the Python function
object, so a program is compiled again by every stage and by every process
that resumes a killed run. JAX's persistent cache is keyed on the lowered
program, its compile options, the XLA flags and the jax/jaxlib versions: a
program compiled once is loaded from disk by the next stage or process that
lowers the same one. On the demo that is mostly the resumed run: its stages
rarely share a program (Expert Iteration's train step differs from the
policy's in the learning-rate schedule's constants, and the sampling stages
decode at different shapes; README, "How long it takes"). The loaded executable is the one compiled before, so the
numbers a run produces do not change (`tests/test_compile_cache.py` checks equal outputs; the demo's
seed 0 gave the same 92 result values with the cache as without it, README).

`CompileClock` reads JAX's own monitoring events, so a stage can say how
much of its time went to tracing, lowering and compiling.
"""

from __future__ import annotations

import contextlib
import os
import threading

import jax
import jax.monitoring
from jax.experimental.compilation_cache import compilation_cache

# Tracing, lowering to StableHLO, and XLA's compile. A cache hit skips only the last: the cache key is
# computed from the lowered program, so tracing and lowering run either way.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"  # JAX's estimate: compile time less load time
_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_totals = {"compile": 0.0, "saved": 0.0, "hits": 0}
_registered = False


def _on_duration(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        with _lock:
            _totals["compile"] += duration
    elif event == _SAVED_EVENT:
        with _lock:
            _totals["saved"] += duration


def _on_event(event: str, **_) -> None:
    if event == _HIT_EVENT:
        with _lock:
            _totals["hits"] += 1


def _register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


class CompileClock:
    """Since it started: seconds spent tracing + lowering + compiling, programs loaded from the persistent
    cache, and the compile seconds those loads saved (JAX's estimate, negative for programs that load
    slower than they compile)."""

    KEYS = ("compile_seconds", "compile_cache_hits", "compile_seconds_saved")

    def __init__(self):
        _register()
        with _lock:
            self._start = dict(_totals)

    def read(self) -> dict[str, float]:
        with _lock:
            return {"compile_seconds": _totals["compile"] - self._start["compile"],
                    "compile_cache_hits": _totals["hits"] - self._start["hits"],
                    "compile_seconds_saved": _totals["saved"] - self._start["saved"]}


def workdir_cache(workdir: str, enabled: bool = True) -> str:
    """Where a run in `workdir` keeps its compiled programs: `<workdir>/xla_cache`, or '' (nothing to set up)
    when disabled or when this process already has a cache (JAX_COMPILATION_CACHE_DIR or jax.config),
    which is then used as the caller set it."""
    if not enabled or jax.config.jax_compilation_cache_dir:
        return ""
    return os.path.join(os.path.abspath(workdir), "xla_cache")


@contextlib.contextmanager
def persistent(directory: str, min_compile_seconds: float = 0.2):
    """Within the block, compiled programs are written to and read from `directory`; after it, the
    process's previous cache settings are back (a library call must not leave its cache on for the caller).

    Programs that compiled in under `min_compile_seconds` are not written: loading
    them costs about what compiling does, and a run makes thousands of them."""
    if not directory:
        raise ValueError("compile_cache.persistent needs a directory")
    os.makedirs(directory, exist_ok=True)
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    _set(dict(zip(names, (directory, min_compile_seconds, 0))))
    try:
        yield
    finally:
        _set(before)


def _set(settings: dict) -> None:
    for name, value in settings.items():
        jax.config.update(name, value)
    # JAX decides whether the cache is on at the first compile of a process and keeps that answer
    # (and the directory it opened); this makes it look again.
    compilation_cache.reset_cache()
    _register()
