"""The executor as a security boundary: hostile programs are refused or stopped with a named verdict."""

import os
import time

import pytest

from glore_jax.execution import Limits, refusal, run_many, run_tests

TESTS = [((2, 3), 5), ((10, -4), 6)]
FAST = Limits(wall_seconds=4.0, test_seconds=0.5, cpu_seconds=4, memory_mb=256)

# (program, the verdict prefix it must get): each would harm or hang an unprotected trainer.
HOSTILE = [
    ("import os\ndef solve(a, b):\n    return os.system('touch /tmp/pwned')", "refused:forbidden_syntax"),
    ("from subprocess import run\ndef solve(a, b):\n    return 1", "refused:forbidden_syntax"),
    ("import socket\ndef solve(a, b):\n    return 1", "refused:forbidden_syntax"),
    ("def solve(a, b):\n    return __import__('os')", "refused:forbidden_name"),
    ("def solve(a, b):\n    return open('/etc/passwd').read()", "refused:forbidden_attribute"),
    ("def solve(a, b):\n    f = open\n    return f('/tmp/pwned', 'w')", "refused:unknown_name"),
    ("def solve(a, b):\n    return ().__class__.__bases__[0].__subclasses__()", "refused:forbidden_attribute"),
    ("def solve(a, b):\n    return (lambda: 0).__globals__", "refused:forbidden_attribute"),
    ("def solve(a, b):\n    return '{0.__class__}'.format(a)", "refused:forbidden_attribute"),
    ("def solve(a, b):\n    return getattr(a, '__class__')", "refused:forbidden_call"),
    ("def solve(a, b):\n    return eval('a + b')", "refused:forbidden_call"),
    ("def solve(a, b):\n    exec('x = 1')\n    return 1", "refused:forbidden_call"),
    ("def solve(a, b):\n    return globals()", "refused:forbidden_call"),
    ("def solve(a, b):\n    return __builtins__", "refused:forbidden_name"),
    ("def solve(a, b):\n    global x\n    return 1", "refused:forbidden_syntax"),
    ("def solve(a, b):\n    with a:\n        return 1", "refused:forbidden_syntax"),
    ("def solve(a, b):\n    while True:\n        pass", "timeout"),
    ("def solve(a, b):\n    x = [0] * (10 ** 10)\n    return 1", "memory"),
    # 800 MB: the machine could give it, the 256 MB address-space limit must not.
    ("def solve(a, b):\n    x = [0] * (10 ** 8)\n    return len(x)", "memory"),
    ("def solve(a, b):\n    return solve(a + 1, b)", "error:RecursionError"),
    ("def solve(a, b):\n    return 10 ** (10 ** 9)", "timeout"),
    ("def solve(a, b):\n    return list(range(10 ** 6))", "output_too_large"),
    ("def solve(a, b):\n    while True:\n        a = a + 1\nx = solve(1, 2)", "timeout"),   # hangs at import time
    ("def solve(a, b):\n    return " + "(" * 500 + "1" + ")" * 500, "refused:syntax"),
    ("def solve(a, b):\n    return 1\x00", "refused:syntax"),
    ("x = 1", "refused:no_entry"),
]


def test_at_least_fifteen_hostile_programs():
    assert len(HOSTILE) >= 15


@pytest.mark.parametrize("source,expected", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_program_gets_a_named_verdict_and_touches_nothing(source, expected, tmp_path):
    sentinel = "/tmp/pwned"
    before = os.path.exists(sentinel)
    t0 = time.perf_counter()
    report = run_tests(source, "solve", TESTS, FAST)
    assert len(report.verdicts) == len(TESTS)
    assert all(v.startswith(expected) for v in report.verdicts), (report, expected)
    assert report.passed == 0
    assert time.perf_counter() - t0 < FAST.wall_seconds + 3   # the wall limit holds (and the parent is alive)
    assert os.path.exists(sentinel) == before


def test_correct_wrong_and_crashing_programs_are_told_apart():
    good = "def solve(a, b):\n    total = 0\n    for x in [a, b]:\n        total += x\n    return total"
    assert run_tests(good, "solve", TESTS, FAST).verdicts == ("pass", "pass")
    wrong = "def solve(a, b):\n    return a - b if a > 5 else a + b"
    assert run_tests(wrong, "solve", TESTS, FAST).verdicts == ("pass", "wrong_answer")
    crash = "def solve(a, b):\n    return [a][b]"
    assert run_tests(crash, "solve", TESTS, FAST).verdicts == ("error:IndexError", "error:IndexError")
    pair = "def solve(a, b):\n    return (a, b)"
    assert run_tests(pair, "solve", [((1, 2), [1, 2])], FAST).verdicts == ("pass",)   # tuples equal lists


def test_a_timeout_in_one_test_does_not_spoil_the_next():
    src = "def solve(a, b):\n    while a > 5:\n        pass\n    return a + b"
    assert run_tests(src, "solve", TESTS[::-1] + TESTS, FAST).verdicts == ("timeout", "pass", "pass", "timeout")


def test_run_many_keeps_order():
    jobs = [(f"def solve(a, b):\n    return a + b + {k}", "solve", [((0, 0), k)]) for k in range(5)]
    assert [r.verdicts for r in run_many(jobs, FAST, workers=2)] == [("pass",)] * 5
    assert refusal("def solve(a, b):\n    return sorted([b, a])", "solve") is None
