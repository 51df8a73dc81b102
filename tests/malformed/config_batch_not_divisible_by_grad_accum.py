"""Malformed on purpose (tests/test_malformed.py): a batch that grad_accum cannot split"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs"))
import smoke  # noqa: E402


def get_config():
    c = smoke.get_config()
    c.workdir = "/tmp/glore_malformed_unused"
    c.train.grad_accum = 3
    return c
