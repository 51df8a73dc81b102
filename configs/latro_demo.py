"""LaTRO on the demo's task, from the demo pipeline's policy, against answer-only SFT for the same steps.

    python -m glore_jax.pipeline                                        # first: the demo (writes workdir/demo)
    python -m glore_jax.rl.latro_recipe --config=configs/latro_demo.py  # both runs, then report.{json,md}
    python -m glore_jax.train --config=configs/latro_demo.py:latro      # or one run on its own

Each step samples 16 questions x K = 8 rationales (the paper: K = 16; 8
keeps the batch at the GRPO demo's 128 sequences) and takes one RLOO step.
Two settings differ from the official code, for this policy:
- the answer string is the task's own final line, `latro_hash` ("#### {gold}"),
  not "The answer is {gold}.": the demo policy never wrote the official
  string, and it pays 120-150 nats for the template's tokens whatever
  the rationale, against about 0 for "#### " after a rationale line, so the
  reward's spread is the gold number's likelihood (0 when the rationale
  reaches it, ~10 nats per wrong digit) instead of template noise;
- temperature 0.7 (the official 1.0): the GRPO demo's finding on this policy
  (see configs/rl_demo.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402

from glore_jax.rl.latro_recipe import RUNS, recipe_knobs, run_configs  # noqa: E402


def get_config(run: str | None = None):
    """The recipe's shared config; `run` (latro, sft_answer) is that one training job's config (any other
    name is the demo's stage of that name)."""
    if run not in (None, *RUNS):
        return demo.get_config(run)
    c = demo.get_config("rl")
    c.unlock()
    c.objective = "latro"
    c.workdir = "workdir/latro_demo"
    c.init_from = "workdir/demo/stages/ei_1"   # the demo's policy after SFT and Expert Iteration
    c.data.data_dir = "workdir/demo/data"
    c.data.eval_split = "test"
    c.latro.k, c.latro.temperature, c.latro.answer_format = 8, 0.7, "latro_hash"
    c.latro.max_rationale_tokens, c.latro.max_prompt_len = 96, 80   # the pipeline's sampling limits
    c.train.total_steps = 200             # 25,600 rationales: the GRPO demo's sample budget
    c.train.batch_size = 128              # rationales: 16 questions x latro.k
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 10
    c.train.weight_decay = 0.0
    c.train.log_every = 5
    c.train.eval_every = 0                # the report evaluates all of test at the end
    c.train.eval_batches = 1
    c.train.checkpoint_every = 25
    c.latro_recipe = recipe_knobs()
    c.lock()
    return run_configs(c)[run] if run else c
