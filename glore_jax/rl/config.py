"""The `rl.*` knobs of an experiment config, typed; what each means and its default.

`train.batch_size` counts sequences, so each step samples
`batch_size / group_size` prompts, `group_size` completions each.
"""

from __future__ import annotations

import dataclasses

from glore_jax.errors import ConfigError
from glore_jax.rl.advantages import ESTIMATORS
from glore_jax.rl.losses import AGGREGATIONS, KL_ESTIMATORS, RATIO_LEVELS

REWARDS = ("exact", "exact+format")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    group_size: int = 8             # G completions per prompt
    estimator: str = "grpo"         # grpo | rloo | reinforce (advantages)
    beta: float = 0.04              # KL-to-reference weight in the loss; 0 = no reference model
    kl: str = "k3"                  # k1 | k3
    clip_eps: float = 0.2
    aggregation: str = "sequence_mean"   # sequence_mean (GRPO) | token_mean (DAPO) | constant (Dr. GRPO)
    ratio_level: str = "token"      # token | sequence
    mu: int = 1                     # optimisation steps per batch of rollouts
    temperature: float = 1.0        # sampling temperature (log-probs use the same scaled logits)
    max_new_tokens: int = 128
    max_prompt_len: int = 128
    reward: str = "exact"           # exact: 1 if the final answer is right; exact+format: + 0.1 for a `#### N` line

    def check(self, batch_size: int) -> None:
        for value, valid, name in ((self.estimator, ESTIMATORS, "estimator"), (self.kl, KL_ESTIMATORS, "kl"),
                                   (self.aggregation, AGGREGATIONS, "aggregation"),
                                   (self.ratio_level, RATIO_LEVELS, "ratio_level"), (self.reward, REWARDS, "reward")):
            if value not in valid:
                raise ConfigError(f"rl.{name} {value!r} unknown; valid: {list(valid)}")
        if self.group_size < 1 or batch_size % self.group_size:
            raise ConfigError(f"train.batch_size {batch_size} must be a multiple of rl.group_size {self.group_size}")
        if self.estimator != "reinforce" and self.group_size < 2:
            raise ConfigError(f"rl.estimator {self.estimator!r} needs rl.group_size >= 2")
        for name in ("mu", "max_new_tokens", "max_prompt_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.beta < 0 or not 0 < self.clip_eps < 1 or self.temperature <= 0:
            raise ConfigError("rl.beta must be >= 0, rl.clip_eps in (0, 1) and rl.temperature > 0")


SCORE_STAGES = (1, 2)
TURN1_RETURNS = ("unshaped", "shaped")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """The `score.*` knobs of the SCoRe objective (Kumar et al. 2024); see `glore_jax.rl.score`.

    The KL weights replace `rl.beta` for this objective (it reads every other `rl.*` knob).
    """

    stage: int = 2              # 1: initialisation (turn-2 reward only, turn 1 held by beta2); 2: both turns
    alpha: float = 10.0         # stage 2's bonus: r2 + alpha * (r2 - r1); 0 = plain two-turn RL (the ablation)
    beta1: float = 0.01         # KL weight on turn 2 (both stages) and on turn 1 in stage 2
    beta2: float = 0.25         # KL weight on turn 1 in stage 1 (the paper: 0.1 on MATH, 0.25 on MBPP)
    reference: str = ""         # KL reference: a saved model or workdir ('' = the run's initial params)
    turn1_return: str = "unshaped"  # stage 2, turn 1's return: unshaped r1 + r2, or shaped r1 + r^2 (see rl.score)

    def check(self) -> None:
        if self.stage not in SCORE_STAGES:
            raise ConfigError(f"score.stage must be 1 or 2, got {self.stage!r}")
        if self.turn1_return not in TURN1_RETURNS:
            raise ConfigError(f"score.turn1_return {self.turn1_return!r} unknown; valid: {list(TURN1_RETURNS)}")
        if self.alpha < 0 or self.beta1 < 0 or self.beta2 < 0:
            raise ConfigError("score.alpha, score.beta1 and score.beta2 must be >= 0")


LATRO_SPANS = ("clean", "official")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatroConfig:
    """The `latro.*` knobs of the LaTRO objective (Chen et al. 2024); see `glore_jax.rl.latro`.

    Defaults are the official code's (SalesforceAIResearch/LaTRO, `TrainerConfig`), except
    `answer_span` (see `rl.latro.sequence`). `train.batch_size` counts rationales: each step
    samples `batch_size / k` questions, `k` rationales each.
    """

    k: int = 16                      # rationales per question (RLOO group)
    beta: float = 0.05               # KL-to-reference weight, inside the reward (on the rationale)
    sft_penalty: float = 0.0         # weight of -mean(r): the answer's log-likelihood trained directly
    max_rationale_tokens: int = 200  # sampling limit; a rationale that reaches it gets the non-stop penalty
    temperature: float = 1.0         # sampling temperature (rationale log-probs use the same scaled logits)
    max_prompt_len: int = 128
    answer_format: str = "latro"     # prompt format of the answer y: latro "The answer is {gold}." | latro_hash "#### {gold}"
    answer_span: str = "clean"       # clean: the answer's tokens; official: also the rationale's last token
    non_stop_penalty: bool = True    # a rationale that never stopped gets r = penalty_multiplier * batch mean of r
    penalty_multiplier: float = 2.0
    reference: str = ""              # KL reference: a saved model or workdir ('' = the run's initial params)

    def check(self, batch_size: int) -> None:
        from glore_jax.rl.latro import ANSWER_FORMATS  # late: rl.latro imports the prompt registry
        if self.k < 2 or batch_size % self.k:
            raise ConfigError(f"latro.k must be >= 2 (RLOO leaves one out) and divide train.batch_size "
                              f"{batch_size}, got {self.k}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ConfigError(f"latro.answer_format {self.answer_format!r} unknown; valid: {list(ANSWER_FORMATS)}")
        if self.answer_span not in LATRO_SPANS:
            raise ConfigError(f"latro.answer_span {self.answer_span!r} unknown; valid: {list(LATRO_SPANS)}")
        if self.max_rationale_tokens < 1 or self.max_prompt_len < 1:
            raise ConfigError("latro.max_rationale_tokens and latro.max_prompt_len must be >= 1")
        if self.beta < 0 or self.sft_penalty < 0 or self.temperature <= 0:
            raise ConfigError("latro.beta and latro.sft_penalty must be >= 0 and latro.temperature > 0")

    def sampling(self) -> RLConfig:
        """The rollout knobs in `rl.*` terms, for the shared sampling machinery (`rl.Rollouts`)."""
        return RLConfig(group_size=self.k, estimator="rloo", beta=self.beta, temperature=self.temperature,
                        max_new_tokens=self.max_rationale_tokens, max_prompt_len=self.max_prompt_len)
