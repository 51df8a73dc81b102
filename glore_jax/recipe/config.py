"""One experiment config for the whole recipe: shared keys, per-stage training overrides, pipeline knobs.

An experiment file's `get_config()` returns the shared config plus
  stages.<name>  {objective, prompt_format, total_steps, learning_rate} for each trained model;
  glore          sampling and inference knobs of the pipeline.
`glore_jax.train --config=FILE:stage` trains one stage (`stage_config`), and
`glore_jax.pipeline --config=FILE` runs them all, each stage deriving its
training config from the same shared one, so the two can never disagree.
"""

from __future__ import annotations

import copy
import dataclasses

from ml_collections import ConfigDict

from glore_jax.errors import ConfigError

# stage -> (objective, prompt format); the order is the pipeline's. '' is the
# objective's own format, so `--config.objective=sorm` on a stage config works.
TRAINED_STAGES = {
    "policy": ("sft", ""),
    "ei": ("sft", ""),                # each Expert Iteration round
    "orm": ("orm", ""),
    "sorm": ("sorm", ""),
    "global_refiner": ("sft", "global_refiner"),
    "local_refiner": ("sft", "local_refiner"),
    "rl": ("grpo", ""),               # optional (glore.rl_stage): GRPO on the final policy
    "rerank_orm": ("orm", ""),        # optional (glore.rerank_orm): the ORM fine-tuned on refinements
    "refiner": ("sft", "refiner"),    # optional (glore.joint_refiner): one model for global and local pairs
}
# Steps and learning rate of the optional stages when a config does not set them.
OPTIONAL_STAGES = {"rl": (100, 1e-4), "rerank_orm": (150, 5e-4), "refiner": (600, 1e-3)}


# glore.sorm_init -> the model the SORM stage starts from (a stage artefact name).
SORM_INITS = {"policy": "policy_final", "orm": "orm"}


def glore_knobs() -> ConfigDict:
    g = ConfigDict()
    g.policy_val_target = 0.0       # > 0: the stage making the final policy (each EI round; `policy` without EI) ends
    g.policy_eval_every = 25        #   at the first eval (every this many steps) whose validation greedy accuracy
                                    #   reaches this; its total_steps is then a cap
    g.ei_rounds = 1                 # Expert Iteration rounds after SFT
    g.ei_k = 4                      # samples per train question per round (paper: 96)
    g.ei_from_base = True           # re-fine-tune from the base model each round (paper) or continue
    g.train_questions = 0           # train questions used for sampling stages (0 = all)
    g.temperature = 0.7             # sampling temperature of EI, ORM data and best-of-n
    g.orm_k = 4                     # samples per train question for ORM / refinement data
    g.sorm_solutions = 0            # sampled solutions to label by rollouts (0 = all ORM samples)
    g.sorm_wrong_share = 0.0        # > 0: that share of the labelled solutions drawn from wrong samples (0 = as sampled)
    g.sorm_k = 8                    # rollouts per step prefix
    g.check_intermediate = True     # a verifying rollout must reuse the step's result (see README: label precision)
    g.check_arithmetic = True       # verifying rollouts and refiner targets must compute right (sorm_labels)
    g.balance = True                # balance SORM positives/negatives per step index
    g.sorm_init = "policy"          # the SORM's starting weights: "policy" (the paper) or "orm" (a warm start)
    g.global_pairs_per_question = 4
    g.reference_fallback = False    # refinement targets from reference solutions when the policy has none
    g.local_pairs_from_rollouts = True  # failed rollouts through the first bad step pair with verified ones before it
    g.test_questions = 0            # test questions for inference (0 = all)
    g.val_questions = 200           # train questions carved out (never trained on) to calibrate the ORM gate
    g.orm_threshold = -1.0          # when: refine if ORM P(correct) of the draft is below this; < 0 = calibrate
    g.sorm_threshold = 0.5          # where: the first step whose SORM value is below this; < 0 = calibrate each
                                    #   value model's on validation for where-accuracy (stage `locate`)
    g.best_of = 3
    g.value_eval_k = 2              # policy samples per test question for ORM/SORM step accuracy
    g.value_eval_split = "test"     # "val": evaluate the value models on the validation questions (to choose variants)
    g.max_new_tokens = 256
    g.max_prompt_len = 256          # refiner prompts hold question + draft; see data.max_len
    g.sample_rows = 64              # sequences per compiled sampler call
    g.shard_size = 128              # questions per resumable output shard of a sampling stage
    g.joint_refiner = False         # one refiner trained on global and local pairs (stage `refiner`) instead of two
    g.rerank_orm = False            # fine-tune the ORM on graded refinements before it gates and reranks
    g.rerank_drafts = 1024          # ORM samples refined (globally and locally) for that fine-tuning
    g.rl_stage = False              # GRPO (rl.* knobs, stages.rl) on the EI policy; its result is the policy refined
    g.stop_after = ""               # run the stages up to and including this one, then stop ("" = all)
    g.compile_cache = True          # compiled XLA programs kept in <workdir>/xla_cache: a stage reuses what an
                                    #   earlier one (or a killed run) compiled (glore_jax.compile_cache); a cache
                                    #   the caller set (JAX_COMPILATION_CACHE_DIR) is used instead
    return g


@dataclasses.dataclass(frozen=True, kw_only=True)
class GloreConfig:
    """The `glore` knobs, typed (see `glore_knobs` for what each means)."""

    ei_rounds: int
    ei_k: int
    policy_val_target: float = 0.0
    policy_eval_every: int = 25
    ei_from_base: bool
    train_questions: int
    temperature: float
    orm_k: int
    sorm_solutions: int
    sorm_wrong_share: float
    sorm_k: int
    check_intermediate: bool
    check_arithmetic: bool
    balance: bool
    sorm_init: str
    global_pairs_per_question: int
    reference_fallback: bool
    local_pairs_from_rollouts: bool
    test_questions: int
    val_questions: int
    orm_threshold: float
    sorm_threshold: float
    best_of: int
    value_eval_k: int
    value_eval_split: str
    max_new_tokens: int
    max_prompt_len: int
    sample_rows: int
    shard_size: int
    joint_refiner: bool
    rerank_orm: bool
    rerank_drafts: int
    rl_stage: bool
    stop_after: str = ""
    compile_cache: bool = True

    def __post_init__(self):
        if self.sorm_init not in SORM_INITS:
            raise ConfigError(f"glore.sorm_init must be one of {sorted(SORM_INITS)}, got {self.sorm_init!r}")
        if not 0 <= self.sorm_wrong_share <= 1:
            raise ConfigError(f"glore.sorm_wrong_share must be in [0, 1], got {self.sorm_wrong_share}")
        if not 0 <= self.policy_val_target <= 1 or self.policy_eval_every <= 0:
            raise ConfigError(f"glore.policy_val_target must be in [0, 1] and glore.policy_eval_every > 0, got "
                              f"{self.policy_val_target} and {self.policy_eval_every}")
        if self.value_eval_split not in ("test", "val"):
            raise ConfigError(f"glore.value_eval_split must be 'test' or 'val', got {self.value_eval_split!r}")

    @classmethod
    def from_config(cls, glore: ConfigDict) -> "GloreConfig":
        return cls(**glore.to_dict())


def add_pipeline(config: ConfigDict, steps: dict[str, tuple], **knobs) -> ConfigDict:
    """Adds `stages` and `glore` knobs to a shared config.

    steps: stage -> (total_steps, learning_rate[, max_len]); max_len defaults
    to data.max_len (refiner inputs hold a draft too, so they need more).
    "rl", "rerank_orm" and "refiner" are optional (`OPTIONAL_STAGES` when absent); they run only
    with glore.rl_stage, glore.rerank_orm and glore.joint_refiner.
    """
    config.stages = ConfigDict()
    for name, (objective, prompt_format) in TRAINED_STAGES.items():
        total_steps, lr, *rest = steps[name] if name in steps or name not in OPTIONAL_STAGES else OPTIONAL_STAGES[name]
        config.stages[name] = ConfigDict({"objective": objective, "prompt_format": prompt_format,
                                          "total_steps": total_steps, "learning_rate": lr,
                                          "max_len": rest[0] if rest else config.data.max_len})
    config.glore = glore_knobs()
    for key, value in knobs.items():
        if key not in config.glore:
            raise ConfigError(f"unknown glore knob {key!r}; valid: {sorted(config.glore)}")
        config.glore[key] = value
    return config


def stage_config(config: ConfigDict, stage: str) -> ConfigDict:
    """The shared config with one stage's objective, prompt format and train overrides applied."""
    if "stages" not in config or stage not in config.stages:
        valid = sorted(config.stages) if "stages" in config else []
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {valid}")
    c = copy.deepcopy(config)
    s = config.stages[stage]
    c.unlock()
    c.objective, c.data.prompt_format = s.objective, s.prompt_format
    c.train.total_steps, c.train.learning_rate = s.total_steps, s.learning_rate
    c.data.max_len = s.max_len
    c.lock()
    return c
