"""Tiny model on a small synthetic task: every objective and every pipeline stage runs in seconds.

    python -m glore_jax.train --config=configs/smoke.py --config.workdir=/tmp/smoke [--config.objective=sorm]
    python -m glore_jax.pipeline --config=configs/smoke.py --config.workdir=/tmp/smoke_pipeline
"""

from glore_jax.recipe.config import add_pipeline, stage_config
from glore_jax.training.config import base_config, locked


def get_config(stage: str | None = None):
    c = base_config()
    c.model.preset = "tiny"
    c.data.max_len = 128
    c.data.tokenizer_vocab_size = 320
    c.data.synthetic.train_size = 64
    c.data.synthetic.test_size = 16
    c.data.synthetic.min_steps = 1
    c.data.synthetic.max_steps = 2
    c.train.total_steps = 20
    c.train.batch_size = 8
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 2
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 1
    c.train.checkpoint_every = 10
    add_pipeline(c, {name: (20, 3e-3) for name in ("policy", "ei", "orm", "sorm", "global_refiner", "local_refiner",
                                                   "refiner")},
                 joint_refiner=True,  # as configs/demo.py; tests/test_pipeline.py's GSM8K run trains two
                 ei_k=2, orm_k=2, sorm_k=2, train_questions=16, test_questions=8, val_questions=8, value_eval_k=1,
                 sorm_threshold=-1.0,  # as the demo: each value model's locator chosen on validation (stage `locate`)
                 # a 20-step model is rarely right: reference targets keep every stage fed
                 reference_fallback=True,
                 max_new_tokens=48, max_prompt_len=112, sample_rows=16, shard_size=8)
    return stage_config(locked(c), stage or "policy")
