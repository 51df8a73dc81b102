"""The value-scoring API: P(correct) at step ends, the same on one device and on an 8-device mesh."""

import functools

import jax
import numpy as np
import pytest

from glore_jax import models as M
from glore_jax import prompts
from glore_jax import sharding as shd
from glore_jax.scoring import ValueScorer
from glore_jax.tasks import SyntheticConfig, generate_split
from glore_jax.tokenizer import train_tokenizer


def test_scores_match_a_direct_forward_on_any_mesh():
    records = list(generate_split(SyntheticConfig(train_size=12, test_size=2, seed=5), "train"))
    tok = train_tokenizer((t for r in records for t in (r["question"], r["answer"])), 320)
    cfg = M.preset("tiny", heads=("value",), vocab_size=384)
    params = M.init_params(cfg, jax.random.key(3))
    items = [(r["question"], r["answer"]) for r in records[:5]]
    one = ValueScorer(cfg, params, tok, max_len=640, rows=4).step_probs(items)   # 2 chunks, one padded
    mesh = shd.make_mesh((2, 2, 2))
    eight = ValueScorer(cfg, M.shard_params(cfg, params, mesh), tok, max_len=640, rows=4, mesh=mesh)
    assert eight.rows == 4
    for a, b in zip(one, eight.step_probs(items)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    forward = jax.jit(functools.partial(M.apply, cfg, want_logits=False))  # eager, its ops dominated this test
    for (q, s), probs in zip(items, one):
        ex = prompts.value_example(tok, q, s)
        values = forward(params, ex.tokens[None]).values[0]
        want = jax.nn.sigmoid(values)[ex.step_end_mask > 0]
        assert len(probs) == prompts.num_scorable_positions(s)
        np.testing.assert_allclose(probs, want, atol=1e-5)
    with pytest.raises(ValueError, match="'value' head"):
        ValueScorer(M.preset("tiny"), params, tok, max_len=640)
