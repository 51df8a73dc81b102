"""The experiment config: an ml_collections schema at the edge, frozen typed configs inside.

One experiment config file serves both `python -m glore_jax.train` (one
objective) and the GLoRe pipeline (every stage, each deriving its training
config from the shared keys). Config files start from `base_config()`, set
what differs, and return it locked, so a misspelled override fails at once
naming the key instead of silently training something else.

`experiment(config)` checks the ConfigDict once and turns it into an
`Experiment` of frozen dataclasses (`DataConfig`, `TrainConfig`, `ModelSpec`,
`sharding.MeshConfig`); from there on, every function takes only the typed
piece it reads, so its signature says what it depends on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ml_collections import ConfigDict, config_dict

from glore_jax.errors import ConfigError
from glore_jax.agent.config import AgentConfig
from glore_jax.models import PRESETS, ModelConfig, preset
from glore_jax.rl.config import LatroConfig, RLConfig, ScoreConfig
from glore_jax.sharding import MeshConfig
from glore_jax.tasks import TASKS, ProgramConfig, SyntheticConfig

# ModelConfig fields a config may override on top of its preset. Those that
# change param shapes must agree with a model loaded by `init_from` or resume.
MODEL_OVERRIDES = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                   "dtype", "remat")
COMPUTE_OVERRIDES = ("dtype", "remat")
VOCAB_MULTIPLE = 128
# The synthetic generator's knobs a config exposes (all but `operators`).
SYNTHETIC_KEYS = ("train_size", "test_size", "seed", "min_steps", "max_steps", "min_operand", "max_operand",
                  "max_factor", "max_value")
# The program generator's knobs (`glore_jax.tasks.programs`), all of them.
PROGRAM_KEYS = tuple(f.name for f in dataclasses.fields(ProgramConfig))


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.objective = "sft"
    c.workdir = ""
    c.seed = 0
    # A saved model dir (glore_jax.convert / models.checkpoints) or an earlier stage's workdir.
    c.init_from = ""

    c.model = ConfigDict()
    c.model.preset = "tiny"
    for name in MODEL_OVERRIDES:
        kind = {"dtype": str, "remat": bool}.get(name, int)
        # None keeps the preset's value; vocab_size None means "fit the tokenizer".
        setattr(c.model, name, config_dict.placeholder(kind))

    c.data = ConfigDict()
    c.data.task = "synthetic"
    c.data.split = "train"
    c.data.eval_split = "test"          # '' disables eval
    c.data.prompt_format = ""           # '' = the objective's default
    c.data.records = ""                 # a records file (data.store) replacing the task split
    c.data.eval_records = ""
    c.data.skip_bad_records = False     # skip (and count) malformed lines of records files instead of failing
    c.data.max_len = 512
    c.data.pack = False                 # several examples per row, each its own segment (data.packing)
    c.data.data_dir = ""                # TFDS dir; '' = <workdir>/tfds
    c.data.manual_dir = ""              # gsm8k/svamp source files; '' = download
    c.data.tokenizer = ""               # sentencepiece model; '' = train one (synthetic task only)
    c.data.tokenizer_vocab_size = 512   # for the in-process trained tokenizer
    c.data.synthetic = ConfigDict()
    defaults = SyntheticConfig()
    for name in SYNTHETIC_KEYS:
        setattr(c.data.synthetic, name, getattr(defaults, name))
    c.data.programs = ConfigDict(dataclasses.asdict(ProgramConfig()))  # task 'programs': its generator knobs

    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.train = ConfigDict()
    c.train.total_steps = 1000
    c.train.batch_size = 32             # global, all processes
    c.train.grad_accum = 1              # micro-batches per step (batch_size must divide by it)
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.0             # > 0: the model a run hands on is this EMA of its params (state.param_ema)
    c.train.log_every = 10
    c.train.eval_every = 200            # 0 disables periodic eval (it still runs at the end)
    c.train.stop_metric = ""            # end the run at the first eval where this metric reaches stop_at ('' = never)
    c.train.stop_at = 0.0               # (total_steps is then a cap; see glore.policy_val_target)
    c.train.eval_batches = 4
    c.train.checkpoint_every = 200
    c.train.max_to_keep = 2
    c.train.peak_tflops = 0.0           # per device, for MFU; 0 = guess from the device kind

    c.rl = ConfigDict(dataclasses.asdict(RLConfig()))  # on-policy RL (`grpo`); see glore_jax.rl.config
    c.score = ConfigDict(dataclasses.asdict(ScoreConfig()))  # SCoRe's stage, bonus and KL weights (`score`)
    c.latro = ConfigDict(dataclasses.asdict(LatroConfig()))  # LaTRO's K, KL weight, answer format (`latro`)
    c.agent = ConfigDict(dataclasses.asdict(AgentConfig()))  # RefineRL's turns, skepticism, reward (`refinerl`)
    return c


def locked(config: ConfigDict) -> ConfigDict:
    config.lock()
    return config


def check(config: ConfigDict) -> None:
    """Value checks that name the bad key and the valid choices."""
    from glore_jax import objectives  # late: objectives import models, which is heavy
    objectives.get(config.objective)
    if config.model.dtype not in (None, "auto", "float32", "bfloat16"):
        raise ConfigError(f"model.dtype {config.model.dtype!r} unknown; valid: auto, float32, bfloat16")
    if config.model.preset not in PRESETS:
        raise ConfigError(f"model.preset {config.model.preset!r} unknown; valid presets: {sorted(PRESETS)}")
    if config.data.task not in TASKS:
        raise ConfigError(f"data.task {config.data.task!r} unknown; valid tasks: {list(TASKS)}")
    if not config.workdir:
        raise ConfigError("workdir must be set (e.g. --config.workdir=/tmp/run)")
    mesh = {k: config.mesh[k] for k in ("data", "fsdp", "tensor")}
    if list(mesh.values()).count(-1) > 1 or any(v == 0 or v < -1 for v in mesh.values()):
        raise ConfigError(f"mesh {mesh}: each of mesh.data, mesh.fsdp, mesh.tensor must be positive, and at most "
                          "one may be -1 (all remaining devices)")
    t = config.train
    for key in ("total_steps", "batch_size", "grad_accum", "log_every", "eval_batches", "checkpoint_every",
                "max_to_keep"):
        if t[key] <= 0:
            raise ConfigError(f"train.{key} must be positive, got {t[key]}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by train.grad_accum {t.grad_accum}")
    if t.learning_rate <= 0 or t.warmup_steps < 0 or t.grad_clip < 0 or t.eval_every < 0:
        raise ConfigError("train.learning_rate must be > 0 and warmup_steps, grad_clip, eval_every >= 0")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = off), got {t.ema_decay}")
    if t.stop_metric and not t.eval_every:
        raise ConfigError(f"train.stop_metric={t.stop_metric!r} needs periodic evals: set train.eval_every > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop's knobs (`config.train`); see `base_config` for what each means."""

    total_steps: int
    batch_size: int
    grad_accum: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    ema_decay: float = 0.0
    log_every: int
    eval_every: int
    eval_batches: int
    stop_metric: str = ""
    stop_at: float = 0.0
    checkpoint_every: int
    max_to_keep: int
    peak_tflops: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where examples come from (`config.data`), with `data_dir` resolved against the workdir."""

    task: str
    split: str
    eval_split: str
    prompt_format: str
    records: str
    eval_records: str
    skip_bad_records: bool
    max_len: int
    pack: bool
    data_dir: str
    manual_dir: str
    tokenizer: str
    tokenizer_vocab_size: int
    synthetic: SyntheticConfig | None       # the generator's knobs; None for the other tasks
    programs: ProgramConfig | None = None   # the program generator's knobs (task 'programs')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A preset plus overrides; the vocab is fixed only once the tokenizer is known (`build`)."""

    preset: str
    overrides: tuple[tuple[str, Any], ...] = ()

    def build(self, tokenizer_vocab: int) -> ModelConfig:
        """The fresh model the config describes; vocab fits the tokenizer unless set explicitly."""
        overrides = dict(self.overrides)
        overrides.setdefault("vocab_size", round_vocab(tokenizer_vocab))
        result = preset(self.preset, **overrides)
        check_vocab(result, tokenizer_vocab)
        return result

    def compute(self) -> dict[str, Any]:
        """The overrides that may change on top of a loaded checkpoint (shape knobs belong to it)."""
        return {k: v for k, v in self.overrides if k in COMPUTE_OVERRIDES}

    def check_loaded(self, model: ModelConfig, source: str) -> None:
        """Fails if a shape override disagrees with a model loaded from `source` (it cannot apply).

        Under `init_from` or on resume the checkpoint decides the shapes; an
        override that asks for other shapes would otherwise be dropped while
        `config.json` records it as used.
        """
        for key, value in self.overrides:
            if key not in COMPUTE_OVERRIDES and getattr(model, key) != value:
                raise ConfigError(f"model.{key}={value} cannot apply: the model comes from {source}, whose "
                                  f"{key} is {getattr(model, key)}; remove the override (shapes belong to the "
                                  "loaded model)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment:
    """One training job's whole config, typed; built once from the ConfigDict by `experiment`."""

    objective: str
    workdir: str
    seed: int
    init_from: str
    model: ModelSpec
    data: DataConfig
    mesh: MeshConfig
    train: TrainConfig
    rl: RLConfig = RLConfig()
    score: ScoreConfig = ScoreConfig()
    latro: LatroConfig = LatroConfig()
    agent: AgentConfig = AgentConfig()
    source_json: str = "{}"                 # the ConfigDict as given, saved as the workdir's config.json

    def replace(self, **changes) -> "Experiment":
        return dataclasses.replace(self, **changes)


def experiment(config: ConfigDict) -> Experiment:
    """Checks `config` and returns its typed form: the edge between ml_collections and the code."""
    check(config)
    d = config.data
    synthetic = SyntheticConfig(**{k: d.synthetic[k] for k in SYNTHETIC_KEYS}) if d.task == "synthetic" else None
    programs = (ProgramConfig(**{k: d.programs[k] for k in PROGRAM_KEYS})
                if d.task == "programs" and "programs" in d else ProgramConfig() if d.task == "programs" else None)
    data = DataConfig(task=d.task, split=d.split, eval_split=d.eval_split, prompt_format=d.prompt_format,
                      records=d.records, eval_records=d.eval_records,
                      skip_bad_records=d.skip_bad_records, max_len=d.max_len, pack=d.pack,
                      data_dir=d.data_dir or os.path.join(config.workdir, "data"), manual_dir=d.manual_dir,
                      tokenizer=d.tokenizer, tokenizer_vocab_size=d.tokenizer_vocab_size, synthetic=synthetic,
                      programs=programs)
    overrides = tuple((k, resolve_dtype(v) if k == "dtype" else v) for k in MODEL_OVERRIDES
                      if (v := config.model[k]) is not None)
    return Experiment(objective=config.objective, workdir=os.path.abspath(config.workdir), seed=config.seed,
                      init_from=config.init_from, model=ModelSpec(preset=config.model.preset, overrides=overrides),
                      data=data, mesh=mesh_config(config), train=TrainConfig(**config.train.to_dict()),
                      rl=RLConfig(**config.rl.to_dict()) if "rl" in config else RLConfig(),
                      score=ScoreConfig(**config.score.to_dict()) if "score" in config else ScoreConfig(),
                      latro=LatroConfig(**config.latro.to_dict()) if "latro" in config else LatroConfig(),
                      agent=AgentConfig(**config.agent.to_dict()) if "agent" in config else AgentConfig(),
                      source_json=config.to_json_best_effort(indent=2))


def resolve_dtype(dtype: str) -> str:
    """A compute dtype, with "auto" replaced by this machine's faster one (`glore_jax.hardware`)."""
    if dtype != "auto":
        return dtype
    from glore_jax import hardware  # late: it touches the devices
    return hardware.fastest_dtype()


def mesh_config(config: ConfigDict) -> MeshConfig:
    return MeshConfig(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor)


def round_vocab(n: int) -> int:
    """Embedding rows rounded up so the vocab axis splits evenly over tensor-parallel devices."""
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_vocab(model: ModelConfig, tokenizer_vocab: int) -> None:
    if model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model vocab_size {model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer_vocab} (sentencepiece pieces plus control tokens)")
