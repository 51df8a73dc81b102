"""Command line for one training job: `python -m glore_jax.train --config=configs/smoke.py --config.workdir=/tmp/x`.

Any config key can be overridden (`--config.train.total_steps=50`,
`--config.objective=sorm`); config files return a locked ConfigDict, so a
misspelled key fails at once and names itself. Bad input (a config value, a
record, a path) ends in one `error:` line and exit code 2 (`glore_jax.cli`);
`--verbose` adds the traceback. Multi-process runs
set GLORE_DISTRIBUTED=1 (the launch script does), which makes every process
join `jax.distributed` before anything touches a device (`glore_jax.distributed`).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from glore_jax import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (e.g. configs/smoke.py).",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    distributed.initialize_from_env()  # before anything touches a device
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
    cli.main(main)
