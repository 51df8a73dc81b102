"""Files that survive a kill: atomic writes, tolerant jsonl reads, and the one-writer workdir lock.

Every status and record file glore_jax writes (`train_done.json`,
`config.json`, a stage's `done.json`, records, reports) goes through
`write_atomic`: a temp file in the same directory, fsync, then rename, so a
reader sees the old file or the whole new one, never a torn one. The one
file that is appended to, `metrics.jsonl`, cannot be renamed per line; its
reader (`read_jsonl`) skips a torn last line, which is what a kill during
an append leaves, and counts it.

`WorkdirLock` makes a workdir single-writer: two trainers on one workdir
would interleave metrics and race inside Orbax. The lock is an `flock` on
`<workdir>/LOCK`, so the kernel drops it when its holder dies, and the file
names the holder (pid, host, time) for the error a second writer gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from typing import Any

from absl import logging

from glore_jax.errors import WorkdirLocked

LOCK_FILE = "LOCK"


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` to `path` by temp file, fsync and rename: all or nothing, even on a kill."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    write_atomic(path, json.dumps(obj, **dump_kwargs))


def read_json_file(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _fsync_dir(directory: str) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends one line and flushes it; a kill mid-append leaves at most a torn last line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(rows, torn): the JSON objects of an append-only jsonl file, skipping a torn last line.

    Only the last line may be torn (an append cut by a kill); a bad line
    before it means the file was damaged some other way, and raises.
    """
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows, torn = [], 0
    content = [(k, line) for k, line in enumerate(lines, start=1) if line.strip()]
    for index, (lineno, line) in enumerate(content):
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if index == len(content) - 1:
                torn += 1
                continue
            from glore_jax.errors import DataError
            raise DataError(f"{os.fspath(path)}:{lineno}: unreadable line in an append-only file ({e})") from None
        rows.append(row)
    return rows, torn


class WorkdirLock:
    """Exclusive use of a workdir by this process (`with WorkdirLock(d): ...`).

    A second writer fails at once with `WorkdirLocked`, naming the holder.
    A lock file left by a dead process is taken over, and the takeover is
    logged. Locks are per process: the same process may not take one twice.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirLocked(
                f"workdir {os.path.dirname(self.path)} is in use by pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('since', '?')}); wait for it to finish or stop it, "
                "or use another workdir") from None
        previous = _holder(fd)
        if previous.get("pid") is not None:
            # flock held nothing, so the process that wrote this is gone (or on another host without
            # shared locks): its lock is stale.
            logging.warning("workdir %s: taking over a stale lock of pid %s on host %s (since %s)",
                            os.path.dirname(self.path), previous.get("pid"), previous.get("host"),
                            previous.get("since"))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file is a released one, not a stale one
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8")
        return json.loads(text) if text.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return {}
