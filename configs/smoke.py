"""Tiny model on a small synthetic task: every objective trains in seconds (tests and CI).

    python -m glore_jax.train --config=configs/smoke.py --config.workdir=/tmp/smoke [--config.objective=sorm]
"""

from glore_jax.training.config import base_config, locked


def get_config():
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
    return locked(c)
