"""A toy on-policy experience source and a REINFORCE objective: the training loop's RL interface, proven.

`ToyOnPolicy` samples G completions per question from the *current* params
(the one generation API), rewards them by exact final answer, and hands the
loop a batch whose advantages are each reward minus its group's mean. The
`reinforce` objective reads them, plus a frozen reference policy for a KL
penalty, so the frozen slot is exercised too. Run as a script, it trains
one such job (the kill -9 test runs it in a subprocess):

    python -m tests.onpolicy --workdir DIR --init_from POLICY_DIR --tokenizer TOK --steps N
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glore_jax import data, models, prompts
from glore_jax.objectives import FrozenSpec, Objective, pair
from glore_jax.sampling import Generator, SamplingStrategy, StopCondition
from glore_jax.tasks import SyntheticConfig, generate_split, is_correct

TASK = SyntheticConfig(train_size=96, test_size=8, min_steps=1, max_steps=1, min_operand=2, max_operand=9,
                       max_factor=3, max_value=40, seed=11)
KL_BETA = 0.05
PROMPT_LEN = 64


class ToyOnPolicy:
    """`questions_per_step` questions per step, G samples each; the cursor is the resumable state."""

    def __init__(self, run, records, *, questions_per_step: int = 4, group: int = 4, max_new: int = 40):
        self.run, self.records = run, list(records)
        self.n, self.group, self.max_new = questions_per_step, group, max_new
        self.position = 0

    def next(self, params, step, rng):
        del step
        run, tok = self.run, self.run.tokenizer
        chosen = [self.records[(self.position + i) % len(self.records)] for i in range(self.n)]
        self.position += self.n
        ids = [prompts.get("policy").prompt(tok, r) for r in chosen]
        assert max(map(len, ids)) <= PROMPT_LEN, "a toy question does not fit; raise PROMPT_LEN"
        gen = Generator(run.model, params, max_new=self.max_new, mesh=run.mesh, pad_id=tok.pad_id,
                        vocab_limit=tok.vocab_size, rows=self.n * self.group, max_prompt_len=PROMPT_LEN)
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))  # from the loop's (seed, step) stream
        outs = gen.generate(ids, k=self.group, strategy=SamplingStrategy(temperature=1.0),
                            stop=StopCondition(eos_id=tok.eos_id), seed=seed)
        width = PROMPT_LEN + self.max_new
        rows = {k: [] for k in ("tokens", "loss_mask", "positions", "segment_ids")}
        rewards = []
        for prompt, record, group in zip(ids, chosen, outs):
            for c in group:
                text = tok.decode(c.tokens[:-1] if c.stopped else c.tokens)
                rewards.append(float(is_correct(text, record["gold"])))
                seq = prompt + c.tokens
                pad = width - len(seq)
                rows["tokens"].append(seq + [tok.pad_id] * pad)
                rows["loss_mask"].append([0.0] * len(prompt) + [1.0] * len(c.tokens) + [0.0] * pad)
                rows["positions"].append(list(range(len(seq))) + [0] * pad)
                rows["segment_ids"].append([1] * len(seq) + [0] * pad)
        r = np.asarray(rewards, np.float32).reshape(self.n, self.group)
        advantages = (r - r.mean(axis=1, keepdims=True)).reshape(-1)  # REINFORCE with the group-mean baseline
        local = {k: np.asarray(v, np.float32 if k == "loss_mask" else np.int32) for k, v in rows.items()}
        local.update(advantages=advantages, rewards=r.reshape(-1))
        return {**data.put_local(run.mesh, local), "id": [x["id"] for x in chosen for _ in range(self.group)]}

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = int(state["position"])


def _sequence_logprobs(config, params, batch):
    out = models.apply(config, params, batch["tokens"], batch["positions"], batch["segment_ids"], want_values=False)
    logp = -optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], batch["tokens"][:, 1:])
    return logp * batch["loss_mask"][:, 1:]


def reinforce_loss(params, batch, rng, config, frozen):
    del rng
    logp = _sequence_logprobs(config, params, batch)
    ref = jax.lax.stop_gradient(_sequence_logprobs(config, frozen["reference"], batch))
    pg = -jnp.sum(batch["advantages"] * jnp.sum(logp, axis=1))
    kl = jnp.sum(logp - ref)  # the k1 estimator on the sampled tokens
    loss_sum = pg + KL_BETA * kl
    b = batch["advantages"].shape[0]
    return loss_sum, {"loss": pair(loss_sum, b), "reward": pair(jnp.sum(batch["rewards"]), b),
                      "kl": pair(kl, jnp.sum(batch["loss_mask"]))}


REINFORCE = Objective(name="toy_reinforce", loss_fn=reinforce_loss, heads=("lm",), default_format="policy",
                      frozen=(FrozenSpec(name="reference"),))


def config(workdir, tokenizer, init_from, steps, checkpoint_every=2):
    from configs.smoke import get_config
    c = get_config()
    c.workdir, c.init_from, c.data.tokenizer, c.data.eval_split = str(workdir), str(init_from), tokenizer, ""
    c.train.total_steps, c.train.learning_rate, c.train.warmup_steps = steps, 1e-3, 0
    c.train.log_every, c.train.checkpoint_every, c.train.batch_size = 1, checkpoint_every, 16
    return c


def train(workdir, tokenizer, init_from, steps, checkpoint_every=2):
    from glore_jax import trainer
    records = list(generate_split(TASK, "train"))
    return trainer.train(config(workdir, tokenizer, init_from, steps, checkpoint_every), objective=REINFORCE,
                         source=lambda run: ToyOnPolicy(run, records))


def main():
    p = argparse.ArgumentParser()
    for flag in ("--workdir", "--init_from", "--tokenizer"):
        p.add_argument(flag, required=True)
    p.add_argument("--steps", type=int, required=True)
    args = p.parse_args()
    train(args.workdir, args.tokenizer, args.init_from, args.steps)
    print(json.dumps({"finished": args.steps}))


if __name__ == "__main__":
    main()
