"""RefineRL on the program-synthesis task, from scratch on CPU: SFT, then GRPO and RefineRL from it.

    python -m glore_jax.agent.recipe --config=configs/refinerl_demo.py      # all runs, then report.{json,md}
    python -m glore_jax.train --config=configs/refinerl_demo.py:sft         # or one run on its own

Runs (each in <workdir>/<run>, see glore_jax.agent.recipe):
    sft        a `mini` policy trained on two-turn agent traces (`agent` format): first attempts
               (the reference, or a planted bug with no loss), the sandbox's report, the refinement
    grpo       `refinerl` with agent.turns = 1: single-turn GRPO on the hidden-test reward
    refinerl   `refinerl` with agent.turns = 2, skeptical: a refinement turn after every attempt
Both RL runs start from sft, sample the same number of questions per step, and take the same steps.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402

from glore_jax.agent.recipe import RUNS, recipe_knobs, run_configs  # noqa: E402


def get_config(run: str | None = None):
    """The recipe's shared config; `run` (sft, grpo, refinerl) is that one training job's config (any other
    name is the demo's stage of that name: every config file serves the pipeline's stages)."""
    if run not in (None, *RUNS):
        return demo.get_config(run)
    c = demo.get_config("rl")   # the shared keys; the task, lengths and RL knobs are set below
    c.unlock()
    c.workdir = "workdir/refinerl_demo"
    c.data.prompt_format = ""
    c.objective = "refinerl"
    c.model.preset = "mini"
    c.model.dtype = "auto"
    c.data.task = "programs"
    c.data.tokenizer_vocab_size = 1000
    c.data.programs.train_size = 8000
    c.data.programs.test_size = 500
    c.data.max_len = 320
    c.train.batch_size = 64            # RL: 8 questions x rl.group_size episodes
    c.train.total_steps = 100
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 5
    c.train.weight_decay = 0.0
    c.train.log_every = 5
    c.train.eval_every = 0             # the report evaluates all of test at the end
    c.train.eval_batches = 1
    c.train.checkpoint_every = 20
    c.rl.group_size, c.rl.temperature = 8, 0.7
    c.rl.max_prompt_len, c.rl.max_new_tokens = 112, 96
    c.rl.beta = 0.0
    c.agent.turns = 2
    # Reports run to ~100 tokens (digits are single pieces): 40 cut most of them, an input the SFT
    # traces never showed, and seed 1's refinement turns collapsed on it (results/, attempt 1).
    c.agent.max_obs_tokens = 128
    c.refinerl_recipe = recipe_knobs()
    c.lock()
    return run_configs(c)[run] if run else c
