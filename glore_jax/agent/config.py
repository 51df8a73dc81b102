"""The `agent.*` knobs of the RefineRL objective, typed; the sampling knobs are `rl.*`'s."""

from __future__ import annotations

import dataclasses

from glore_jax.errors import ConfigError

AGENT_REWARDS = ("binary", "fraction")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentConfig:
    turns: int = 2              # attempts per episode: 1 = single-turn GRPO on the same reward
    skeptical: bool = True      # refine also after every public check passed (False: stop at a pass)
    reward: str = "binary"      # binary: all hidden tests pass; fraction: the share passed (programs)
    shaping: float = 0.0        # + shaping * (r_final - r_first): a bonus for progress across turns
    max_obs_tokens: int = 128   # a tool report is cut to this many tokens ([FIX] included); SFT traces never
                                # cut, so a cut report is unseen input (`obs_cut` counts them; keep it 0)

    def check(self) -> None:
        if self.turns < 1:
            raise ConfigError(f"agent.turns must be >= 1, got {self.turns}")
        if self.reward not in AGENT_REWARDS:
            raise ConfigError(f"agent.reward {self.reward!r} unknown; valid: {list(AGENT_REWARDS)}")
        if self.shaping < 0 or self.max_obs_tokens < 2:
            raise ConfigError("agent.shaping must be >= 0 and agent.max_obs_tokens >= 2")
