"""The attention core (`models.attention_core`): its hand-written gradient and its causal query blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glore_jax import models as M
from glore_jax.models import attention_core as core
from glore_jax.models.attention_core import attention_mask, causal_self_attention, self_attention

TINY = M.preset("tiny")


def _autodiff_attention(q, k, v, mask):
    """The textbook form, differentiated by JAX: what `self_attention`'s hand-written gradient must equal."""
    s = jnp.einsum("bkgtd,bkds->bkgts", q.astype(jnp.float32), k.astype(jnp.float32))
    s = jnp.where(mask[:, None, None], s, -0.7 * float(jnp.finfo(jnp.float32).max))
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_self_attention_gradient_matches_autodiff(dtype, tol):
    b, kvh, g, t, d = 3, 2, 2, 7, 4
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, kvh, g, t, d)).astype(dtype)
    k = jax.random.normal(keys[1], (b, kvh, d, t)).astype(dtype)
    v = jax.random.normal(keys[2], (b, kvh, t, d)).astype(dtype)
    # Row 0 plain causal, row 1 two packed documents, row 2 right padding (two empty query slots).
    pos = jnp.asarray([list(range(7)), [0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, -1, -1]], jnp.int32)
    seg = jnp.asarray([[1] * 7, [1, 1, 1, 2, 2, 2, 2], [1] * 5 + [0, 0]], jnp.int32)
    mask = attention_mask(pos, pos, seg, seg, None)
    w = jax.random.normal(keys[3], (b, kvh, g, t, d))  # a loss that weights every output differently

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) * w)

    out, ref = jax.jit(self_attention)(q, k, v, mask), jax.jit(_autodiff_attention)(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)
    got = jax.jit(jax.grad(functools.partial(loss, self_attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(functools.partial(loss, _autodiff_attention), argnums=(0, 1, 2)))(q, k, v)
    for name, a, e in zip("qkv", got, want):
        assert a.dtype == dtype, name
        scale = float(jnp.max(jnp.abs(e)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), atol=tol * scale,
                                   err_msg=f"d{name}")


def test_query_block_edges_follow_the_rule():
    assert core.query_block_edges(96) == [0, 96]
    assert core.query_block_edges(176) == [0, 88, 176]  # the demo's SFT rows: two blocks
    assert core.query_block_edges(256) == [0, 85, 171, 256]  # the refiners' rows: three
    assert len(core.query_block_edges(100_000)) == core.MAX_QUERY_BLOCKS + 1
    assert core.query_block_edges(13, 4) == [0, 3, 6, 10, 13]


def _rows(t):
    """Positions and segment ids of four rows of t slots: causal; two packed documents; right padding
    at position -1 (prefill's padding); right padding as the trainer pads (position 0, segment 0)."""
    causal = list(range(t))
    packed = list(range(t // 2)) + list(range(t - t // 2))
    real = t - 4
    pos = [causal, packed, list(range(real)) + [-1] * 4, list(range(real)) + [0] * 4]
    seg = [[1] * t, [1] * (t // 2) + [2] * (t - t // 2), [1] * real + [0] * 4, [1] * real + [0] * 4]
    real_q = np.ones((4, t), bool)
    real_q[2:, real:] = False
    return jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32), real_q


@pytest.mark.parametrize("t,block", [(13, 4), (13, 7), (16, 8)])
def test_causal_query_blocks_equal_one_block_on_real_tokens(t, block):
    """Outputs at real queries and all gradients (padding's outputs weighted 0, as the loss weighs them)."""
    kvh, g, d = 2, 2, 4
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (4, kvh, g, t, d))
    k = jax.random.normal(keys[1], (4, kvh, d, t))
    v = jax.random.normal(keys[2], (4, kvh, t, d))
    pos, seg, real_q = _rows(t)
    mask = attention_mask(pos, pos, seg, seg, None)
    w = jax.random.normal(keys[3], q.shape) * jnp.asarray(real_q)[:, None, None, :, None]
    assert len(core.query_block_edges(t, block)) > 2  # the blocked path runs

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) * w)

    blocked = functools.partial(causal_self_attention, block=block)
    out, ref = jax.jit(blocked)(q, k, v, mask), jax.jit(self_attention)(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out)[np.broadcast_to(real_q[:, None, None, :, None], out.shape)],
                               np.asarray(ref)[np.broadcast_to(real_q[:, None, None, :, None], ref.shape)],
                               atol=1e-5, rtol=1e-5)
    got = jax.jit(jax.grad(functools.partial(loss, blocked), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(functools.partial(loss, self_attention), argnums=(0, 1, 2)))(q, k, v)
    for name, a, e in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-5, err_msg=f"d{name}")


def test_causal_query_blocks_leave_the_models_loss_and_gradient(monkeypatch):
    """A padded, packed batch through the whole model: blocks of 3 slots against one block."""
    params = M.init_params(TINY, jax.random.key(0))
    t = 12
    tokens = jax.random.randint(jax.random.key(2), (4, t), 0, TINY.vocab_size)
    pos, seg, real_q = _rows(t)
    pos = jnp.maximum(pos, 0)  # the trainer's padding: position 0, segment 0
    weight = jnp.asarray(real_q, jnp.float32)

    def loss(p):
        logits = M.apply(TINY, p, tokens, pos, seg, want_values=False).logits
        return jnp.sum(jnp.sum(logits ** 2, axis=-1) * weight) * 1e-3

    # jit: eager dispatch of the model's small ops was most of this test's time. Each call traces a new
    # function object, so each reads QUERY_BLOCK as it is set then.
    monkeypatch.setattr(core, "QUERY_BLOCK", 10**6)
    l1, g1 = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setattr(core, "QUERY_BLOCK", 3)
    l4, g4 = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(l4), float(l1), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g4), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * (float(jnp.max(jnp.abs(b))) + 1e-8))


def test_causal_query_blocks_leave_the_prefill(monkeypatch):
    """Right-padded prompts (padding at position -1): the same last-token logits and real slots' keys and values."""
    from glore_jax.models.decoding import prefill

    params = M.init_params(TINY, jax.random.key(0))
    prompts = jax.random.randint(jax.random.key(3), (3, 11), 0, TINY.vocab_size)
    lengths = jnp.asarray([11, 7, 4], jnp.int32)
    monkeypatch.setattr(core, "QUERY_BLOCK", 10**6)  # (jit: as in the test above)
    cache1, logits1 = jax.jit(functools.partial(prefill, TINY))(params, prompts, lengths)
    monkeypatch.setattr(core, "QUERY_BLOCK", 3)
    cache4, logits4 = jax.jit(functools.partial(prefill, TINY))(params, prompts, lengths)
    np.testing.assert_allclose(np.asarray(logits4), np.asarray(logits1), atol=1e-5, rtol=1e-5)
    real = np.arange(11)[None, :] < np.asarray(lengths)[:, None]  # [B, S]
    for k1, k4 in zip(cache1.k[1:], cache4.k[1:]):  # layer 0's keys come before any attention
        np.testing.assert_allclose(np.asarray(k4).transpose(0, 3, 1, 2)[real], np.asarray(k1).transpose(0, 3, 1, 2)[real],
                                   atol=1e-5)
    for v1, v4 in zip(cache1.v[1:], cache4.v[1:]):
        np.testing.assert_allclose(np.asarray(v4).transpose(0, 2, 1, 3)[real], np.asarray(v1).transpose(0, 2, 1, 3)[real],
                                   atol=1e-5)
