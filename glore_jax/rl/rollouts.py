"""On-policy experience: each step's batch is sampled from the params being trained, then rewarded.

`Rollouts` is an experience source of the one loop (`training.experience`):
for `train.batch_size / rl.group_size` prompts per step it samples G
completions each with the project's jitted sampler (prefix shared across
the G rows), rewards every completion with a plain Python callable, and
hands the loop a batch:

    tokens, positions, segment_ids   [B, P + N]   prompt (cut from the left to P) + completion + pad
    loss_mask                        [B, P + N]   1 on completion tokens (EOS included), 0 on prompt and pad
    advantages, rewards, correct, stopped   [B]   groups of G contiguous rows
    old_logprobs                     [B, P + N]   only with rl.mu > 1: log pi_old at sampling time

With `rl.mu > 1` the same rollouts serve mu consecutive steps, the old
log-probs fixed at sampling time, so steps 2..mu have a real importance
ratio. Resume is exact: the prompt cursor (and a batch still being reused)
is in the checkpoint, and the sampler's seed comes from the loop's
(seed, step) stream, so a restarted run draws the same completions.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from glore_jax import data, models, prompts, sharding as shd
from glore_jax.errors import ConfigError
from glore_jax.prompts import fit_prompt
from glore_jax.rl.advantages import advantages
from glore_jax.rl.config import RLConfig
from glore_jax.rl.losses import token_logprobs
from glore_jax.rl.rewards import REWARDS, RewardFn
from glore_jax.sampling import Generator, SamplingStrategy, StopCondition
from glore_jax.tasks import is_correct

@functools.lru_cache(maxsize=8)
def _logprob_fn(config: models.ModelConfig, mesh: Mesh, temperature: float):
    def fn(params, tokens, positions, segment_ids):
        with shd.activation_rules(mesh):
            out = models.apply(config, params, tokens, positions, segment_ids, want_values=False)
        return token_logprobs(out.logits, tokens, temperature)
    return jax.jit(fn)


class Rollouts:
    """The RL experience source (see the module doc). `records` need `question` and `gold`."""

    def __init__(self, run, cfg: RLConfig, records: Sequence[dict], *, reward_fn: RewardFn | None = None,
                 seed: int = 0):
        self.run, self.cfg = run, cfg
        if jax.process_count() > 1:  # every process would sample the same prompts: not yet sharded per host
            raise ConfigError("the rl rollout source runs in one process for now; multi-host RL is not supported yet")
        if run.exp.train.batch_size % cfg.group_size:
            raise ValueError(f"train.batch_size {run.exp.train.batch_size} is not a multiple of rl.group_size")
        self.records = list(records)
        self.prompts_per_step = run.exp.train.batch_size // cfg.group_size
        self.reward_fn = reward_fn or REWARDS[cfg.reward]
        self.seed, self.position = seed, 0
        self.pending: dict[str, np.ndarray] | None = None  # rollouts still to be reused (rl.mu > 1)
        self.served = 0
        self._sample_seconds = 0.0
        self._sampled_tokens = 0
        self.cut_prompts = 0
        self.at_limit = 0  # completions cut at rl.max_new_tokens

    def _chosen(self) -> list[dict]:
        n = len(self.records)
        out = []
        for i in range(self.position, self.position + self.prompts_per_step):
            order = np.random.default_rng([self.seed, i // n]).permutation(n)  # reshuffled each epoch
            out.append(self.records[order[i % n]])
        self.position += self.prompts_per_step
        return out

    def _sample(self, params, rng: jax.Array) -> dict[str, np.ndarray]:
        run, cfg, tok = self.run, self.cfg, self.run.tokenizer
        # The loop dispatches the train step asynchronously; wait for it here so that sampling time
        # does not include the step that produced these params.
        jax.block_until_ready(params)
        t0 = time.perf_counter()
        chosen = self._chosen()
        fitted = [fit_prompt(prompts.get("policy").prompt(tok, r), cfg.max_prompt_len) for r in chosen]
        self.cut_prompts += sum(cut for _, cut in fitted)
        ids = [p for p, _ in fitted]
        gen = Generator(run.model, params, max_new=cfg.max_new_tokens, mesh=run.mesh, pad_id=tok.pad_id,
                        vocab_limit=tok.vocab_size, rows=len(ids) * cfg.group_size, max_prompt_len=cfg.max_prompt_len)
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))  # from the loop's (seed, step) stream
        outs = gen.generate(ids, k=cfg.group_size, strategy=SamplingStrategy(temperature=cfg.temperature),
                            stop=StopCondition(eos_id=tok.eos_id), seed=seed)
        width = cfg.max_prompt_len + cfg.max_new_tokens
        b = len(ids) * cfg.group_size
        arr = {"tokens": np.full((b, width), tok.pad_id, np.int32), "positions": np.zeros((b, width), np.int32),
               "segment_ids": np.zeros((b, width), np.int32), "loss_mask": np.zeros((b, width), np.float32)}
        rewards, correct, stopped = np.zeros(b, np.float32), np.zeros(b, np.float32), np.zeros(b, np.float32)
        row = 0
        for prompt, record, group in zip(ids, chosen, outs):
            for c in group:
                seq = prompt + c.tokens
                arr["tokens"][row, :len(seq)] = seq
                arr["positions"][row, :len(seq)] = np.arange(len(seq))
                arr["segment_ids"][row, :len(seq)] = 1
                arr["loss_mask"][row, len(prompt):len(seq)] = 1.0
                text = tok.decode(c.tokens[:-1] if c.stopped else c.tokens)
                rewards[row] = self.reward_fn(record, text)
                correct[row], stopped[row] = float(is_correct(text, record["gold"])), float(c.stopped)
                row += 1
        arr.update(rewards=rewards, correct=correct, stopped=stopped,
                   advantages=np.asarray(advantages(rewards, cfg.group_size, cfg.estimator), np.float32))
        return self._finish(arr, params, t0)

    def _finish(self, arr: dict[str, np.ndarray], params, t0: float) -> dict[str, np.ndarray]:
        """Adds old log-probs (rl.mu > 1) and counts the sampling time, tokens and cut completions."""
        run, cfg = self.run, self.cfg
        if cfg.mu > 1:
            batch = data.put_local(run.mesh, {k: arr[k] for k in ("tokens", "positions", "segment_ids")})
            arr["old_logprobs"] = np.asarray(_logprob_fn(run.model, run.mesh, cfg.temperature)(
                params, batch["tokens"], batch["positions"], batch["segment_ids"]), np.float32)
        self._sample_seconds += time.perf_counter() - t0
        self._sampled_tokens += int(arr["loss_mask"].sum())
        self.at_limit += int(len(arr["stopped"]) - arr["stopped"].sum())
        return arr

    def next(self, params: Any, step: int, rng: jax.Array) -> dict[str, Any]:
        del step
        if self.pending is None or self.served >= self.cfg.mu:
            self.pending, self.served = self._sample(params, rng), 0
        self.served += 1
        return data.put_local(self.run.mesh, self.pending)

    def state(self) -> dict[str, Any]:
        state = {"position": self.position, "served": self.served, "cut_prompts": self.cut_prompts,
                 "at_limit": self.at_limit}
        if self.pending is not None and self.served < self.cfg.mu:  # mid-cycle: the batch must survive a restart
            state["pending"] = {k: v.tolist() for k, v in self.pending.items()}
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.position, self.served = int(state["position"]), int(state["served"])
        self.cut_prompts, self.at_limit = int(state.get("cut_prompts", 0)), int(state.get("at_limit", 0))
        pending = state.get("pending")
        self.pending = None if pending is None else {
            k: np.asarray(v, np.int32 if k in ("tokens", "positions", "segment_ids", "turn_ids") else np.float32)
            for k, v in pending.items()}

    def metrics(self) -> dict[str, float]:
        """Sampling throughput since the last call (the loop logs it beside the train-step figures)."""
        out = {"sample_seconds": self._sample_seconds,
               "sample_tokens_per_sec": self._sampled_tokens / max(self._sample_seconds, 1e-9)}
        self._sample_seconds, self._sampled_tokens = 0.0, 0
        return out

    @property
    def stats(self) -> dict[str, int]:
        """Completions sampled, prompts cut to rl.max_prompt_len (per completion), completions cut at the limit."""
        return {"examples": self.position * self.cfg.group_size,
                "prompt_truncated": self.cut_prompts * self.cfg.group_size, "target_truncated": self.at_limit,
                "limits": {"prompt_truncated": f"rl.max_prompt_len={self.cfg.max_prompt_len}",
                           "target_truncated": f"rl.max_new_tokens={self.cfg.max_new_tokens}"}}
