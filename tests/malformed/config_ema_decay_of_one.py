"""Malformed on purpose (tests/test_malformed.py): an EMA decay of 1 (the average would never move)"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs"))
import smoke  # noqa: E402


def get_config():
    c = smoke.get_config()
    c.workdir = "/tmp/glore_malformed_unused"
    c.train.ema_decay = 1.0
    return c
