"""RefineRL on the arithmetic task: the same agent loop, with the calculation checker as its tool.

    python -m glore_jax.pipeline                                          # first: the demo (writes workdir/demo)
    python -m glore_jax.train --config=configs/refinerl_arith.py          # skeptical two-turn RL from its policy

The tool (`agent.tools.AnnotationTool`) re-computes every `<<expr=value>>`
of an attempt and reports the wrong ones (the public check); the reward is
the final answer against gold (the hidden one). A wrong value carried into
a correct calculation passes every check, so a refinement turn after a
clean report is as skeptical here as after passing public tests. The demo
policy was trained on single attempts only: its refinement turns start
untrained, and this run shows the loop on a second task rather than a tuned
result (see the README's RefineRL section).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402


def get_config(stage: str | None = None):
    """The RefineRL job; any stage name is the demo's stage of that name."""
    if stage is not None:
        return demo.get_config(stage)
    c = demo.get_config("rl")
    c.unlock()
    c.objective, c.data.prompt_format = "refinerl", ""
    c.workdir = "workdir/refinerl_arith"
    c.init_from = "workdir/demo/stages/ei_1"   # the demo's policy after SFT and Expert Iteration
    c.data.data_dir = "workdir/demo/data"
    c.data.eval_split = "test"
    c.train.batch_size = 64               # 8 questions x rl.group_size episodes
    c.train.total_steps = 50
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 5
    c.train.weight_decay = 0.0
    c.train.log_every = 5
    c.train.eval_every = 0
    c.train.eval_batches = 2              # 128 test questions, greedy episodes, at the end
    c.train.checkpoint_every = 25
    c.rl.beta = 0.0
    c.agent.turns, c.agent.max_obs_tokens = 2, 128
    c.lock()
    return c
