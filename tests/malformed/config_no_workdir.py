"""Malformed on purpose (tests/test_malformed.py): no workdir"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs"))
import smoke  # noqa: E402


def get_config():
    c = smoke.get_config()
    c.workdir = "/tmp/glore_malformed_unused"
    c.workdir = ""
    return c
