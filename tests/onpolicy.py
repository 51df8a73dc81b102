"""An on-policy RL job on a toy task: the `grpo` objective of the one loop, run as a script for kill -9 tests.

The policy samples G completions per question from the *current* params
(`rl.Rollouts`), each rewarded by exact final answer; with `rl.mu = 2` every
batch of rollouts serves two steps, so a checkpoint can fall between them
and must carry the batch. A frozen reference policy (the initial params)
gives the KL term. `--objective=score` runs SCoRe's stage II instead: two-turn
episodes (`rl.TwoTurnRollouts`) with the same knobs; `--objective=latro` runs
LaTRO (`latro.*`: K = 4 rationales, the self-reward of "#### gold"); `--objective=refinerl` runs
skeptical two-turn verify-and-refine episodes with the arithmetic task's tool (`agent.*`).

    python -m tests.onpolicy --workdir DIR --init_from POLICY_DIR --tokenizer TOK --steps N [--objective score]
"""

from __future__ import annotations

import argparse
import json

from glore_jax.tasks import SyntheticConfig, generate_split

TASK = SyntheticConfig(train_size=96, test_size=8, min_steps=1, max_steps=1, min_operand=2, max_operand=9,
                       max_factor=3, max_value=40, seed=11)


def config(workdir, tokenizer, init_from, steps, checkpoint_every=3, objective="grpo"):
    from configs.smoke import get_config
    c = get_config()
    c.workdir, c.init_from, c.data.tokenizer, c.data.eval_split = str(workdir), str(init_from), tokenizer, ""
    c.train.total_steps, c.train.learning_rate, c.train.warmup_steps = steps, 1e-3, 0
    c.train.log_every, c.train.checkpoint_every, c.train.batch_size = 1, checkpoint_every, 16
    c.objective = objective
    # SCoRe's stage II: this toy policy never answers a second turn right, so stage I's only reward,
    # r(y2), would be 0 everywhere; stage II's turn-1 return r(y1) + r(y2) varies.
    c.score.stage = 2
    c.rl.group_size, c.rl.mu, c.rl.beta, c.rl.max_new_tokens, c.rl.max_prompt_len = 4, 2, 0.05, 40, 64
    # LaTRO: K rationales per question, the answer scored in the toy task's own "#### N" line.
    c.latro.k, c.latro.max_rationale_tokens, c.latro.max_prompt_len, c.latro.answer_format = 4, 40, 64, "latro_hash"
    # RefineRL: two turns, the calculations re-computed between them (the toy task's tool).
    c.agent.turns, c.agent.max_obs_tokens = 2, 24
    return c


def train(workdir, tokenizer, init_from, steps, checkpoint_every=3, objective="grpo"):
    from glore_jax import trainer
    records = list(generate_split(TASK, "train"))
    return trainer.train(config(workdir, tokenizer, init_from, steps, checkpoint_every, objective), records=records)


def main():
    p = argparse.ArgumentParser()
    for flag in ("--workdir", "--init_from", "--tokenizer"):
        p.add_argument(flag, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--objective", default="grpo", choices=("grpo", "score", "latro", "refinerl"))
    args = p.parse_args()
    train(args.workdir, args.tokenizer, args.init_from, args.steps, objective=args.objective)
    print(json.dumps({"finished": args.steps}))


if __name__ == "__main__":
    main()
