"""RefineRL's experience: skeptical multi-turn episodes from the params being trained, as one batch.

Per step, `batch_size / rl.group_size` questions, G episodes each
(`agent.episodes.run_episodes` at `rl.temperature`). Each row is one
episode:

    tokens      <bos> question <SOL> a_1 <eos> report_1 [FIX] a_2 <eos> ... a_T <eos> pad
    turn_ids    0 ...                1 ... 1  0 ...            2 ... 2  ...  T ... T    0
    loss_mask   turn_ids > 0: sampled tokens only; observations, prompt and pad carry none
    rewards     the final turn's hidden grade, + agent.shaping * (final - first)
    advantages  `rl.estimator` over each question's G rewards (one per row, for every turn's tokens)
    correct, correct_t1, public_t1, changed_passing, fixed, broke, stopped, obs_cut        [B]

The prompt cursor, pending reuse (rl.mu) and exact resume are `Rollouts`'.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np

from glore_jax.agent.config import AgentConfig
from glore_jax.agent.episodes import EpisodeShape, run_episodes, turn_counts
from glore_jax.agent.tools import tool_for
from glore_jax.rl.advantages import advantages
from glore_jax.rl.config import RLConfig
from glore_jax.rl.rollouts import Rollouts


def shape_of(cfg: RLConfig, agent: AgentConfig) -> EpisodeShape:
    return EpisodeShape(turns=agent.turns, max_prompt_len=cfg.max_prompt_len, max_new_tokens=cfg.max_new_tokens,
                        max_obs_tokens=agent.max_obs_tokens)


class AgentRollouts(Rollouts):
    """The `refinerl` objective's experience source (module doc)."""

    def __init__(self, run, cfg: RLConfig, agent: AgentConfig, records: Sequence[dict], *, seed: int = 0):
        super().__init__(run, cfg, records, reward_fn=lambda record, text: 0.0, seed=seed)  # the tool rewards
        self.agent, self.tool = agent, tool_for(run.exp.data.task, agent.reward)
        self._tool_seconds = 0.0

    def _sample(self, params, rng: jax.Array) -> dict[str, np.ndarray]:
        run, cfg, tok = self.run, self.cfg, self.run.tokenizer
        jax.block_until_ready(params)   # keep the step that made these params out of the sampling time
        t0 = time.perf_counter()
        chosen = self._chosen()
        shape = shape_of(cfg, self.agent)
        seed = int(jax.random.randint(rng, (), 0, 2**30))   # from the loop's (seed, step) stream
        episodes = run_episodes(run.model, params, tok, chosen, self.tool, run.mesh, shape, k=cfg.group_size,
                                temperature=cfg.temperature, seed=seed, skeptical=self.agent.skeptical)
        b, width = len(episodes), shape.width
        arr = {"tokens": np.full((b, width), tok.pad_id, np.int32), "positions": np.zeros((b, width), np.int32),
               "segment_ids": np.zeros((b, width), np.int32), "turn_ids": np.zeros((b, width), np.int32)}
        per_row = {k: np.zeros(b, np.float32) for k in ("rewards", "correct", "correct_t1", "public_t1",
                                                       "changed_passing", "passing_turns", "fixed", "broke",
                                                       "stopped", "turns", "obs_cut")}
        for row, ep in enumerate(episodes):
            n = len(ep.tokens)
            arr["tokens"][row, :n] = ep.tokens
            arr["positions"][row, :n] = np.arange(n)
            arr["segment_ids"][row, :n] = 1
            for t, (start, end) in enumerate(ep.spans, 1):
                arr["turn_ids"][row, start:end] = t
            first, last = ep.checks[0], ep.final
            per_row["rewards"][row] = last.reward + self.agent.shaping * (last.reward - first.reward)
            per_row["correct"][row], per_row["correct_t1"][row] = last.solved, first.solved
            per_row["public_t1"][row], per_row["stopped"][row] = first.public_ok, all(ep.stopped)
            per_row["turns"][row], per_row["obs_cut"][row] = len(ep.texts), ep.obs_cut
            for key, value in turn_counts(ep).items():
                per_row[key][row] = value
            self._tool_seconds += sum(c.seconds for c in ep.checks)
        arr.update(per_row)
        arr["loss_mask"] = (arr["turn_ids"] > 0).astype(np.float32)
        arr["advantages"] = np.asarray(advantages(per_row["rewards"], cfg.group_size, cfg.estimator), np.float32)
        return self._finish(arr, params, t0)

    def metrics(self) -> dict[str, float]:
        seconds = self._sample_seconds   # the parent resets it
        out = super().metrics()
        out["tool_share"] = self._tool_seconds / max(seconds, 1e-9)   # of the rollout time (sampling + tool)
        self._tool_seconds = 0.0
        return out
