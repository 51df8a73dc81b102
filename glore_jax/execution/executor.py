"""Run a candidate program on test inputs in a separate, limited process, and say what happened per test.

    report = run_tests(source, "solve", [((3, 4), 7), (([1, 2],), 3)], Limits())
    report.verdicts   # ('pass', 'wrong_answer') or 'error:ZeroDivisionError', 'timeout', 'memory', ...

A security boundary in two layers. The program must pass the AST whitelist
(`execution.policy`; refused programs never start a process: verdict
`refused:<reason>` for every test). It then runs in a fresh `python -I -S`
child, in its own session and an empty temp dir, with an empty
environment, only whitelisted builtins, and limits the child sets on itself
before the program is compiled: address space, CPU seconds, no file writes
(RLIMIT_FSIZE 0), few file descriptors, no core dumps, a recursion limit,
and a per-test timer. The parent kills the whole session at the wall limit.
Whatever the program does, the parent gets verdicts, never an exception.
Not covered: network namespaces (the whitelist leaves no way to reach a
socket, but the child shares the host's network).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from glore_jax.execution.policy import BUILTINS, refusal

_CHILD = r'''
import builtins, json, resource, signal, sys
p = json.loads(sys.stdin.readline())
mb = p["memory_mb"] * 1024 * 1024
for limit, value in ((resource.RLIMIT_AS, mb), (resource.RLIMIT_CPU, p["cpu_seconds"]), (resource.RLIMIT_FSIZE, 0),
                     (resource.RLIMIT_NOFILE, 8), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
class Timeout(BaseException):
    pass
def alarm(*_):
    raise Timeout()
signal.signal(signal.SIGALRM, alarm)
safe = {n: getattr(builtins, n) for n in p["builtins"] if hasattr(builtins, n)}
scope = {"__builtins__": safe}
out = []
def verdict(e):
    if isinstance(e, Timeout):
        return "timeout"
    if isinstance(e, MemoryError):
        return "memory"
    return "error:" + type(e).__name__
sys.setrecursionlimit(p["recursion"])
try:
    signal.setitimer(signal.ITIMER_REAL, p["test_seconds"])
    exec(compile(p["source"], "<candidate>", "exec"), scope)
    signal.setitimer(signal.ITIMER_REAL, 0)
    fn = scope[p["entry"]]
except BaseException as e:
    signal.setitimer(signal.ITIMER_REAL, 0)
    sys.stdout.write(json.dumps({"load": verdict(e)}) + "\n")
    sys.exit(0)
for args in p["inputs"]:
    try:
        signal.setitimer(signal.ITIMER_REAL, p["test_seconds"])
        value = fn(*args)
        signal.setitimer(signal.ITIMER_REAL, 0)
        text = json.dumps(value)
        out.append({"value": text} if len(text) <= p["max_output"] else {"error": "output_too_large"})
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        out.append({"error": verdict(e)})
    sys.stdout.write(json.dumps(out[-1]) + "\n")
    sys.stdout.flush()
'''


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """Per program: wall time for all its tests, CPU, memory, per-test time, recursion, result size."""

    wall_seconds: float = 10.0
    test_seconds: float = 1.0
    cpu_seconds: int = 10
    memory_mb: int = 256
    recursion: int = 200
    max_output: int = 10_000


@dataclasses.dataclass(frozen=True)
class Report:
    verdicts: tuple[str, ...]   # one per test: pass | wrong_answer | timeout | memory | error:<Type> | refused:... | killed
    seconds: float
    outputs: tuple[Any, ...] = ()   # per test, the returned value (JSON-decoded) where there was one, else None

    @property
    def passed(self) -> int:
        return sum(v == "pass" for v in self.verdicts)

    @property
    def all_passed(self) -> bool:
        return bool(self.verdicts) and self.passed == len(self.verdicts)


def _same(got: Any, expected: Any) -> bool:
    # Through JSON on both sides, so a tuple answer equals a list expectation.
    return json.loads(json.dumps(expected)) == got


def run_tests(source: str, entry: str, tests: Sequence[tuple[Sequence[Any], Any]], limits: Limits = Limits()) -> Report:
    """Run `entry(*args)` for each (args, expected) in `tests`; never raises for anything the program does."""
    t0 = time.perf_counter()
    n = len(tests)
    why = refusal(source, entry)
    if why is not None:
        return Report(tuple(f"refused:{why.split(':', 1)[0]}" for _ in range(n)), time.perf_counter() - t0)
    payload = json.dumps({"source": source, "entry": entry, "inputs": [list(a) for a, _ in tests],
                          "builtins": list(BUILTINS), "memory_mb": limits.memory_mb,
                          "cpu_seconds": limits.cpu_seconds, "test_seconds": limits.test_seconds,
                          "recursion": limits.recursion, "max_output": limits.max_output}) + "\n"
    with tempfile.TemporaryDirectory(prefix="glore_exec_") as cwd:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd, env={},
                                start_new_session=True, text=True)
        try:
            out, _ = proc.communicate(payload, timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the whole session: nothing the program started survives
            out, _ = proc.communicate()
    lines = []
    for line in (out or "").splitlines()[:n + 1]:
        try:
            lines.append(json.loads(line))
        except ValueError:
            break
    if lines and "load" in lines[0]:
        return Report(tuple(lines[0]["load"] for _ in range(n)), time.perf_counter() - t0)
    verdicts, outputs = [], []
    for i, (_, expected) in enumerate(tests):
        got = None
        if i >= len(lines):   # no answer: killed at the wall or CPU limit, or the process died
            verdicts.append("timeout" if proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU) else "killed")
        elif "error" in lines[i]:
            verdicts.append(lines[i]["error"])
        else:
            got = json.loads(lines[i]["value"])
            verdicts.append("pass" if _same(got, expected) else "wrong_answer")
        outputs.append(got)
    return Report(tuple(verdicts), time.perf_counter() - t0, tuple(outputs))


def run_many(jobs: Sequence[tuple[str, str, Sequence[tuple[Sequence[Any], Any]]]], limits: Limits = Limits(),
             workers: int = 2) -> list[Report]:
    """`run_tests` for each (source, entry, tests), `workers` child processes at a time, in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda job: run_tests(*job, limits=limits), jobs))
