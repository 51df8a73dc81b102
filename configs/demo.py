"""The `demo` preset through every GLoRe stage on the synthetic task (CPU/one accelerator, minutes).

    python -m glore_jax.train --config=configs/demo.py:sorm --config.workdir=/tmp/demo/sorm

The argument picks the stage; `get_config()` without one is the policy
stage. Each stage is the shared config plus its objective, prompt format
and train knobs (`STAGES`), which is also how `glore_jax.pipeline` derives
them. Without records or init_from, value and refiner stages train on
synthetic labelled data (`glore_jax.data.labelled`) from scratch.
"""

from glore_jax.training.config import base_config, locked

# stage -> (objective, prompt format, train overrides)
STAGES = {
    "policy": ("sft", "policy", {"total_steps": 3000, "learning_rate": 1e-3}),
    "orm": ("orm", "orm", {"total_steps": 1500, "learning_rate": 3e-4}),
    "sorm": ("sorm", "sorm", {"total_steps": 1500, "learning_rate": 3e-4}),
    "global_refiner": ("sft", "global_refiner", {"total_steps": 1500, "learning_rate": 5e-4}),
    "local_refiner": ("sft", "local_refiner", {"total_steps": 1500, "learning_rate": 5e-4}),
}


def shared():
    c = base_config()
    c.model.preset = "demo"
    c.data.max_len = 320
    c.data.tokenizer_vocab_size = 1000
    c.data.synthetic.train_size = 20_000
    c.data.synthetic.test_size = 500
    c.train.batch_size = 32
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.01
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.eval_batches = 8
    c.train.checkpoint_every = 500
    return c


def get_config(stage: str | None = None):
    stage = stage or "policy"
    if stage not in STAGES:
        raise ValueError(f"unknown demo stage {stage!r}; valid stages: {list(STAGES)}")
    objective, prompt_format, train = STAGES[stage]
    c = shared()
    c.objective, c.data.prompt_format = objective, prompt_format
    for key, value in train.items():
        c.train[key] = value
    return locked(c)
