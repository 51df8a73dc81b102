"""SCoRe on the demo's task, from the demo pipeline's policy: stage I, stage II, and the ablation.

    python -m glore_jax.pipeline                                        # first: the demo (writes workdir/demo)
    python -m glore_jax.rl.score_recipe --config=configs/score_demo.py  # all runs, then report.{json,md}
    python -m glore_jax.train --config=configs/score_demo.py:stage1     # or one run on its own

Each step samples 8 questions x 8 first attempts at temperature 0.7 (the
pipeline's sampling temperature, see configs/rl_demo.py), one second attempt
each, and takes one clipped GRPO step on both turns' tokens.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402

from glore_jax.rl.score_recipe import RUNS, recipe_knobs, run_configs  # noqa: E402


def get_config(run: str | None = None):
    """The recipe's shared config; `run` (warmup, stage1, stage2, single) is that one training job's config
    (any other name is the demo's stage of that name)."""
    if run not in (None, *RUNS):
        return demo.get_config(run)
    c = demo.get_config("rl")
    c.unlock()
    c.objective = "score"
    c.workdir = "workdir/score_demo"
    c.init_from = "workdir/demo/stages/ei_1"   # the demo's policy after SFT and Expert Iteration
    c.data.data_dir = "workdir/demo/data"
    c.data.eval_split = "test"
    c.train.batch_size = 64               # episodes: 8 questions x rl.group_size first attempts
    c.train.learning_rate = 1e-4               # 5e-4 drove the turn-2 KL to 0.2 and both turns down in 40 steps
    c.train.warmup_steps = 5
    c.train.weight_decay = 0.0
    c.train.log_every = 5
    c.train.eval_every = 0                # greedy two-turn eval at the end only (the report covers all of test)
    c.train.eval_batches = 1
    c.train.checkpoint_every = 20
    c.score_recipe = recipe_knobs()
    c.lock()
    return run_configs(c)[run] if run else c
