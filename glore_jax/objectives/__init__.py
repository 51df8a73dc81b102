"""Training objectives, chosen by name. Adding one: a module defining an `Objective`, plus one line here.

Objectives whose loss depends on config knobs (`grpo` reads `rl.*`, `score` also `score.*`,
`latro` reads `latro.*`, `refinerl` `rl.*` and `agent.*`) are
registered as builders `experiment -> Objective` and built by `get(name, exp)`.
"""

from glore_jax.errors import ConfigError
from glore_jax.objectives import grpo, latro, refinerl, score
from glore_jax.objectives.base import Batch, FrozenSpec, Metrics, Objective, finalize, pair
from glore_jax.objectives.sft import SFT
from glore_jax.objectives.value import ORM, SORM

OBJECTIVES: dict[str, Objective] = {
    "sft": SFT,
    "orm": ORM,
    "sorm": SORM,
}


BUILDERS = {
    "grpo": lambda exp: grpo.build(exp.rl, exp.train.batch_size),   # rl.estimator: grpo | rloo | reinforce
    "score": lambda exp: score.build(exp.rl, exp.score, exp.train.batch_size),   # score.stage: 1 | 2
    "latro": lambda exp: latro.build(exp.latro, exp.train.batch_size),            # latro.k, beta, sft_penalty
    "refinerl": lambda exp: refinerl.build(exp.rl, exp.agent, exp.train.batch_size),  # agent.turns, skeptical
}


def get(name: str, exp=None) -> Objective | None:
    """The objective `name`; builders need the `Experiment` (without one, the name is only checked: None)."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    if name in BUILDERS:
        return BUILDERS[name](exp) if exp is not None else None
    raise ConfigError(f"unknown objective {name!r}; valid objectives: {sorted({*OBJECTIVES, *BUILDERS})}")


__all__ = ["BUILDERS", "OBJECTIVES", "Batch", "FrozenSpec", "Metrics", "Objective", "finalize", "get", "pair"]
