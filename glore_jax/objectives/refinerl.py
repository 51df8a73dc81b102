"""RefineRL: GRPO on skeptical verify-and-refine episodes, rewarded by hidden tests on the final turn.

The loss is GRPO's (`objectives.grpo.policy_loss_fn`) over every turn's
sampled tokens, observation tokens masked out, with one advantage per
episode from its final reward (`agent.rollouts.AgentRollouts`). With
`agent.turns = 1` it is single-turn GRPO on the same verifiable reward,
which is the baseline RefineRL is compared with. The evaluator runs greedy
episodes on held-out problems and logs pass@1 of the first attempt and of
the final turn.
"""

from __future__ import annotations

from glore_jax.agent.config import AgentConfig
from glore_jax.objectives.base import FrozenSpec, Objective
from glore_jax.objectives.grpo import policy_loss_fn
from glore_jax.rl.config import RLConfig

ROW_MEANS = ("correct_t1", "public_t1", "changed_passing", "passing_turns", "fixed", "broke", "turns", "obs_cut")


def build(cfg: RLConfig, agent: AgentConfig, batch_size: int) -> Objective:
    """The `refinerl` objective for these knobs."""
    cfg.check(batch_size)
    agent.check()
    loss_fn = policy_loss_fn(cfg, agent.turns * cfg.max_new_tokens, ROW_MEANS)

    def experience(run):
        from glore_jax.agent.rollouts import AgentRollouts  # late: the sampler is only needed when training
        return AgentRollouts(run, cfg, agent, run.records, seed=run.exp.seed)

    def evaluate(run):
        from glore_jax.training.evals import held_out_records  # late: evals import the objectives
        records = held_out_records(run)
        return None if records is None else EpisodeEval(run, records, cfg, agent)

    return Objective(name="refinerl", loss_fn=loss_fn, heads=("lm",), default_format="agent",
                     frozen=(FrozenSpec(name="reference"),) if cfg.beta > 0 else (), experience=experience,
                     evaluate=evaluate)


class EpisodeEval:
    """Greedy episodes on held-out records: eval_pass1_first, eval_pass1_final, eval_changed_passing, ..."""

    def __init__(self, run, records, cfg: RLConfig, agent: AgentConfig):
        self.run, self.records, self.cfg, self.agent = run, list(records), cfg, agent

    def __call__(self, params, frozen) -> dict[str, float]:
        del frozen
        from glore_jax.agent.episodes import episode_metrics, run_episodes
        from glore_jax.agent.rollouts import shape_of
        from glore_jax.agent.tools import tool_for
        run = self.run
        episodes = run_episodes(run.model, params, run.tokenizer, self.records,
                                tool_for(run.exp.data.task, self.agent.reward), run.mesh,
                                shape_of(self.cfg, self.agent), skeptical=self.agent.skeptical, rows=64)
        m = episode_metrics(episodes)
        return {f"eval_{k}": float(m[k]) for k in ("pass1_first", "pass1_final", "changed_passing", "fixed", "broke",
                                                   "obs_cut")}
