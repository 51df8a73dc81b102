"""Command line for one training job: `python -m glore_jax.train --config=configs/smoke.py --config.workdir=/tmp/x`.

Any config key can be overridden (`--config.train.total_steps=50`,
`--config.objective=sorm`); config files return a locked ConfigDict, so a
misspelled key fails at once and names itself. Multi-host (TPU pod) runs
set GLORE_DISTRIBUTED=1 (the launch script does), which makes every host
join `jax.distributed` before anything touches a device.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (e.g. configs/smoke.py).",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a misspelled `--config.a.b=v` reported as the key it is."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        overrides = [a.split("=", 1)[0][len("--config."):] for a in argv[1:] if a.startswith("--config.")]
        name = str(e).strip("\"'")
        bad = [o for o in overrides if name and name in o.split(".")]
        if not bad:
            raise
        sys.exit(f"error: unknown config key {bad[0]!r} (no {name!r} at that level; check its spelling "
                 "against the config file)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if os.environ.get("GLORE_DISTRIBUTED") == "1":
        import jax
        jax.distributed.initialize()  # coordinator and process ids come from the TPU environment
    from glore_jax import trainer  # after distributed init: importing may touch devices
    from glore_jax.training.metrics import setup_logging
    setup_logging()
    try:
        trainer.train(_CONFIG.value)
    except trainer.Preempted as e:
        logging.warning("%s", e)
        # Exit 0: the work so far is saved and a restart resumes; schedulers
        # that retry on preemption should key on the log line, not the code.
        sys.exit(0)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
