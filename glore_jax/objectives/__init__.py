"""Training objectives, chosen by name. Adding one: a module defining an `Objective`, plus one line here."""

from glore_jax.errors import ConfigError
from glore_jax.objectives.base import Batch, FrozenSpec, Metrics, Objective, finalize, pair
from glore_jax.objectives.sft import SFT
from glore_jax.objectives.value import ORM, SORM

OBJECTIVES: dict[str, Objective] = {
    "sft": SFT,
    "orm": ORM,
    "sorm": SORM,
}


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; valid objectives: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Batch", "FrozenSpec", "Metrics", "Objective", "finalize", "get", "pair"]
