"""Joining a multi-process JAX job, and the few multi-controller helpers the loops need.

Every entry point (`train`, `pipeline`) calls `initialize_from_env()` before
anything touches a device. Two ways to be one process of many:

  GLORE_DISTRIBUTED=1                       TPU pods: `jax.distributed.initialize()` reads the
                                            coordinator and process ids from the TPU metadata.
  + GLORE_COORDINATOR=host:port             anywhere else (CPU hosts, localhost tests): explicit
    GLORE_NUM_PROCESSES=N GLORE_PROCESS_ID=i  ids, and CPU collectives over gloo, which XLA's CPU
                                            backend needs for any cross-process all-reduce.

Multi-controller rule followed by every helper here: each process makes the
same decisions in the same order (same collectives), and only process 0
writes shared files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from glore_jax.errors import ConfigError

_ENV = ("GLORE_COORDINATOR", "GLORE_NUM_PROCESSES", "GLORE_PROCESS_ID")


def initialize_from_env() -> bool:
    """Joins the job the environment describes; returns whether this is a multi-process run."""
    if os.environ.get("GLORE_DISTRIBUTED") != "1":
        return False
    given = {k: os.environ.get(k) for k in _ENV}
    if not any(given.values()):
        jax.distributed.initialize()  # TPU pod: everything comes from the metadata server
        return True
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ConfigError(f"GLORE_DISTRIBUTED=1 with {', '.join(k for k in _ENV if given[k])} also needs "
                          f"{', '.join(missing)}")
    try:
        num, pid = int(given["GLORE_NUM_PROCESSES"]), int(given["GLORE_PROCESS_ID"])
    except ValueError:
        raise ConfigError(f"GLORE_NUM_PROCESSES and GLORE_PROCESS_ID must be integers, got "
                          f"{given['GLORE_NUM_PROCESSES']!r} and {given['GLORE_PROCESS_ID']!r}") from None
    if not 0 <= pid < num:
        raise ConfigError(f"GLORE_PROCESS_ID {pid} not in [0, {num})")
    # Must be set before the CPU backend starts; a no-op for TPU and GPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=given["GLORE_COORDINATOR"], num_processes=num, process_id=pid)
    return True


def host_array(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly cross-process sharded) array, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def agree(value: Any) -> Any:
    """Process 0's value of a small host decision (a bool, an int), on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return type(value)(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def barrier(name: str) -> None:
    """Every process waits here until all arrive (e.g. after process 0 wrote a file the others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def write_once(path: str, write: Callable[[], None]) -> None:
    """Process 0 runs `write` (which writes `path`); every process returns only once it is there."""
    if jax.process_index() == 0:
        write()
    barrier(f"wrote {path}")


def sum_counts(counts: dict[str, Any]) -> dict[str, Any]:
    """Integer counts summed over processes (each counted only its own data); other values as process 0's."""
    keys = sorted(k for k, v in counts.items() if isinstance(v, (int, np.integer)) and not isinstance(v, bool))
    if jax.process_count() == 1 or not keys:
        return counts
    from jax.experimental import multihost_utils
    every = multihost_utils.process_allgather(np.asarray([counts[k] for k in keys], np.int32))
    return {**counts, **{k: int(v) for k, v in zip(keys, np.asarray(every).reshape(-1, len(keys)).sum(0))}}
