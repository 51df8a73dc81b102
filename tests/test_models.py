"""Backbone, heads, KV cache and sharding of glore_jax.models."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glore_jax import models as M
from glore_jax import sharding as shd
from glore_jax.models.decoding import LayerCache, decode_step, split_layers
from glore_jax.models.layers import write_slots

TINY = M.preset("tiny")


@pytest.fixture(scope="module")
def params():
    return M.init_params(TINY, jax.random.key(0))


def _tokens(b=4, t=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, TINY.vocab_size)


def test_llama2_13b_abstract_param_count_and_shardings():
    cfg = M.preset("llama2_13b")
    abstract = nn.unbox(M.abstract_params(cfg))  # eval_shape: no memory allocated
    n = M.count_params(abstract)
    assert abs(n - 13.0e9) / 13.0e9 < 0.01, n
    mesh = shd.make_mesh((2, 2, 2))
    shardings = M.param_shardings(cfg, mesh)  # raises if any dim is not divisible
    for s, x in zip(jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(abstract)):
        assert s.shard_shape(x.shape)  # valid for this shape on this mesh
    q = shardings["backbone"]["layers"]["attn"]["q"]
    assert q.shard_shape((40, 5120, 40, 128)) == (40, 2560, 20, 128)


def test_param_specs_follow_rules_table(params):
    mesh = shd.make_mesh((2, 2, 2))
    sharded = M.shard_params(TINY, params, mesh)
    spec = lambda *names: shd.logical_to_spec(names)
    layers = sharded["backbone"]["layers"]
    assert sharded["backbone"]["embedding"].sharding.spec == spec("vocab", "embed")
    assert layers["attn"]["q"].sharding.spec == spec("layers", "embed", "heads", "head_dim")
    assert layers["attn"]["k"].sharding.spec == spec("layers", "embed", "kv_heads", "head_dim")
    assert layers["attn"]["o"].sharding.spec == spec("layers", "heads", "head_dim", "embed")
    assert layers["mlp"]["gate"].sharding.spec == spec("layers", "embed", "mlp")
    assert layers["mlp"]["down"].sharding.spec == spec("layers", "mlp", "embed")
    # and the table really splits them: tensor over heads, fsdp over embed
    assert layers["attn"]["q"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_init_on_mesh_places_shards(params):
    mesh = shd.make_mesh((2, 2, 2))
    p = M.init_params(TINY, jax.random.key(0), mesh)
    assert p["backbone"]["layers"]["mlp"]["up"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")
    np.testing.assert_allclose(p["lm_head"]["kernel"], params["lm_head"]["kernel"], atol=0)


def test_sharded_forward_matches_single_device(params):
    tokens = _tokens(8, 16)
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    ref = M.policy_logits(TINY, params, tokens)
    mesh = shd.make_mesh((2, 2, 2))
    fwd = M.make_forward(TINY, mesh)
    out = fwd(M.shard_params(TINY, params, mesh), tokens, positions)
    assert out.sharding.spec == shd.logical_to_spec(("activation_batch", "activation_length", "activation_vocab"))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_incremental_decode_with_cache_matches_full_forward(params):
    tokens = _tokens(3, 10)
    full = M.policy_logits(TINY, params, tokens)
    cache = M.KVCache.empty(TINY, batch=3, length=16)
    step = jax.jit(lambda p, t, pos, c, i: M.apply(TINY, p, t, pos, cache=c, cache_index=i))
    pos = jnp.broadcast_to(jnp.arange(4), (3, 4))
    out = step(params, tokens[:, :4], pos, cache, 0)
    got = [out.logits]
    cache = out.cache
    for i in range(4, 10):
        out = step(params, tokens[:, i:i + 1], jnp.full((3, 1), i), cache, i)
        cache = out.cache
        got.append(out.logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), np.asarray(full), atol=2e-5, rtol=1e-5)
    assert (np.asarray(cache.pos)[:, 10:] == -1).all() and (np.asarray(cache.pos)[:, :10] >= 0).all()


def test_bfloat16_slot_writes_keep_the_bits_of_a_plain_update():
    """`write_slots` writes 16-bit floats through an integer view; the result must be the same array."""
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.standard_normal((2, 3, 8, 4)), jnp.bfloat16)
    new = jnp.asarray(rng.standard_normal((2, 3, 1, 4)), jnp.float32)
    for axis, update in ((2, new), (3, new.transpose(0, 1, 3, 2))):
        got = jax.jit(write_slots, static_argnums=3)(buf, update, jnp.int32(5), axis)
        want = jax.lax.dynamic_update_slice_in_dim(buf, update.astype(jnp.bfloat16), 5, axis)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


def test_bfloat16_cached_decode_matches_bfloat16_full_forward(params):
    config = TINY.replace(dtype="bfloat16")
    tokens = _tokens(2, 8)
    full = M.policy_logits(config, params, tokens)
    cache = M.KVCache.empty(config, batch=2, length=8)
    assert cache.k.dtype == jnp.bfloat16 and cache.k.shape[-2:] == (config.head_dim, 8)
    got = []
    for i in range(8):
        out = M.apply(config, params, tokens[:, i:i + 1], jnp.full((2, 1), i), cache=cache, cache_index=i)
        cache = out.cache
        got.append(out.logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), np.asarray(full), atol=0.05)


def test_padding_is_invisible(params):
    """Right-padded rows give the same logits on their real tokens as unpadded rows."""
    tokens = _tokens(2, 8)
    ref = M.policy_logits(TINY, params, tokens[:, :5])
    mask = jnp.arange(8)[None, :] < 5
    pos = M.positions_from_mask(jnp.broadcast_to(mask, (2, 8)))
    garbage = jnp.where(mask, tokens, 7)
    out = M.apply(TINY, params, garbage, pos).logits[:, :5]
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_packed_segments_do_not_attend_across(params):
    a, b = _tokens(1, 6, seed=2), _tokens(1, 5, seed=3)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[0] * 6 + [1] * 5])
    pos = jnp.array([list(range(6)) + list(range(5))])
    out = M.apply(TINY, params, packed, pos, seg).logits
    np.testing.assert_allclose(out[:, 6:], M.policy_logits(TINY, params, b), atol=2e-5)
    np.testing.assert_allclose(out[:, :6], M.policy_logits(TINY, params, a), atol=2e-5)


def test_sliding_window_limits_attention():
    cfg = TINY.replace(sliding_window=3)
    p = M.init_params(cfg, jax.random.key(0))
    tokens = _tokens(1, 8)
    base = M.policy_logits(cfg, p, tokens)
    changed = M.policy_logits(cfg, p, tokens.at[0, 0].set((tokens[0, 0] + 1) % cfg.vocab_size))
    # With 2 layers and window 3 the first token reaches at most position 4.
    assert not np.allclose(base[0, 1:3], changed[0, 1:3])
    np.testing.assert_allclose(base[0, 5:], changed[0, 5:], atol=1e-6)


def test_bfloat16_compute_is_close_and_params_stay_float32(params):
    cfg = TINY.replace(dtype="bfloat16")
    tokens = _tokens()
    out = M.policy_logits(cfg, params, tokens)
    assert out.dtype == jnp.float32
    ref = M.policy_logits(TINY, params, tokens)
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(M.init_params(cfg, jax.random.key(0))))


def test_tied_embeddings_have_no_lm_head():
    cfg = TINY.replace(tie_embeddings=True)
    p = M.init_params(cfg, jax.random.key(0))
    assert "lm_head" not in p
    h = M.apply(cfg, p, _tokens()).hidden
    np.testing.assert_allclose(M.policy_logits(cfg, p, _tokens()),
                               jnp.einsum("bte,ve->btv", h, p["backbone"]["embedding"]), atol=1e-5)


def test_value_head_shape_and_shared_backbone(params):
    tokens = _tokens(3, 7)
    cfg_shared, shared = M.value_model_from_policy(TINY, params, jax.random.key(5), share_backbone=True)
    assert cfg_shared.heads == ("lm", "value")
    assert shared["backbone"] is params["backbone"]
    v = M.apply(cfg_shared, shared, tokens, want_logits=False).values
    assert v.shape == (3, 7) and v.dtype == jnp.float32
    out = M.apply(cfg_shared, shared, tokens)
    np.testing.assert_allclose(out.logits, M.policy_logits(TINY, params, tokens), atol=1e-6)
    # value = head applied to the *same* hidden states the policy reads
    w, b = shared["value_head"]["kernel"], shared["value_head"]["bias"]
    np.testing.assert_allclose(v, out.hidden @ w + b, atol=1e-5)
    # perturbing the shared backbone moves both heads
    bumped = jax.tree_util.tree_map(lambda x: x * 1.1, shared["backbone"])
    out2 = M.apply(cfg_shared, {**shared, "backbone": bumped}, tokens)
    assert not np.allclose(out2.values, out.values) and not np.allclose(out2.logits, out.logits)


def test_value_model_with_own_backbone_copy(params):
    cfg_v, vparams = M.value_model_from_policy(TINY, params, jax.random.key(5))
    assert cfg_v.heads == ("value",) and set(vparams) == {"backbone", "value_head"}
    assert vparams["backbone"]["embedding"] is not params["backbone"]["embedding"]
    np.testing.assert_array_equal(vparams["backbone"]["embedding"], params["backbone"]["embedding"])
    assert M.apply(cfg_v, vparams, _tokens(2, 5), want_logits=False).values.shape == (2, 5)
    with pytest.raises(ValueError, match="'lm' head"):
        M.policy_logits(cfg_v, vparams, _tokens(2, 5))


def test_bad_configs_and_meshes_raise_clearly():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TINY.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="Unknown model preset 'nope'"):
        M.preset("nope")
    with pytest.raises(ValueError, match="At most one mesh axis"):
        shd.make_mesh((-1, -1, 2))
    with pytest.raises(ValueError, match="needs 12 devices"):
        shd.make_mesh((2, 2, 3))
    assert dict(shd.make_mesh((1, -1, 2)).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="cannot be split"):
        M.param_shardings(TINY.replace(num_kv_heads=1), shd.make_mesh((1, 1, 8)))


@pytest.mark.parametrize("tie", [False, True])
def test_unrolled_decode_with_shared_prefix_matches_full_forward(params, tie):
    """K continuations reading one shared prefix cache give the full forward's logits."""
    config = TINY.replace(tie_embeddings=tie)
    p = params if not tie else M.init_params(config, jax.random.key(3))
    prefix_tokens, k = _tokens(2, 6), 3
    cont = jax.random.randint(jax.random.key(5), (2 * k, 5), 0, config.vocab_size)
    full = M.policy_logits(config, p, jnp.concatenate([jnp.repeat(prefix_tokens, k, 0), cont], 1))
    prefix = LayerCache.from_stacked(M.apply(config, p, prefix_tokens, return_kv=True).cache)
    cache, layers, got = LayerCache.empty(config, 2 * k, 8), split_layers(p), []
    step = jax.jit(functools.partial(decode_step, config))
    for i in range(5):
        logits, cache = step(p, layers, cont[:, i:i + 1], jnp.full((2 * k, 1), 6 + i), cache, i, prefix=prefix)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, 1), np.asarray(full[:, 6:]), atol=2e-5, rtol=1e-5)
    assert (np.asarray(cache.pos)[:, :5] == np.arange(6, 11)).all() and (np.asarray(cache.pos)[:, 5:] == -1).all()
    assert cache.grow(12).length == 12 and (np.asarray(cache.grow(12).pos)[:, 8:] == -1).all()


def test_mlp_decode_view_agrees_with_the_one_param_layout():
    """The sampler's fused gate_up view (derived, never saved) computes the training layout's MLP."""
    from glore_jax.models.decoding import decode_weights
    from glore_jax.models.layers import GATE_UP, MLP
    params = M.init_params(TINY, jax.random.key(5))
    _, layers = decode_weights(TINY, params)
    x = jax.random.normal(jax.random.key(6), (2, 3, TINY.embed_dim))
    stacked = params["backbone"]["layers"]["mlp"]
    for i, layer in enumerate(layers):
        plain = {k: v[i] for k, v in stacked.items()}
        assert set(plain) == {"gate", "up", "down"} and GATE_UP in layer["mlp"]
        want = MLP(TINY).apply({"params": plain}, x)
        got = MLP(TINY).apply({"params": layer["mlp"]}, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    saved = jax.tree_util.tree_flatten_with_path(params)[0]
    assert not any(GATE_UP in jax.tree_util.keystr(path) for path, _ in saved)


def test_attention_decode_view_agrees_with_the_one_param_layout():
    """The sampler's fused qkv view (derived, never saved) computes the training layout's attention."""
    from glore_jax.models.decoding import decode_weights
    from glore_jax.models.layers import QKV, Attention
    params = M.init_params(TINY, jax.random.key(5))
    _, layers = decode_weights(TINY, params)
    x = jax.random.normal(jax.random.key(6), (2, 3, TINY.embed_dim))
    positions = jnp.asarray([[0, 1, 2], [4, 5, -1]], jnp.int32)
    stacked = params["backbone"]["layers"]["attn"]
    for i, layer in enumerate(layers):
        plain = {k: v[i] for k, v in stacked.items()}
        assert set(plain) == {"q", "k", "v", "o"} and set(layer["attn"]) == {QKV, "o"}
        want, (wk, wv) = Attention(TINY).apply({"params": plain}, x, positions, None, None, None)
        got, (gk, gv) = Attention(TINY).apply({"params": layer["attn"]}, x, positions, None, None, None)
        for a, b in ((got, want), (gk, wk), (gv, wv)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    saved = jax.tree_util.tree_flatten_with_path(params)[0]
    assert not any(QKV in jax.tree_util.keystr(path) for path, _ in saved)


def test_training_attention_gradient_matches_the_cached_path(params):
    """The model's gradient through `self_attention` equals the one through the general (cache) path.

    The cache path attends over context segments with the autodiff softmax;
    feeding the same keys as a read-only context segment of an empty cache
    makes it compute the same function as the no-cache path.
    """
    cfg, p = TINY, params
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 6)), jnp.int32)

    def loss(p):
        return jnp.sum(M.apply(cfg, p, tokens, want_values=False).logits ** 2) * 1e-3

    def loss_via_cache(p):
        # An empty cache is a second, fully masked segment: the joint-softmax path runs instead.
        cache = M.KVCache.empty(cfg, 2, 6)
        return jnp.sum(M.apply(cfg, p, tokens, cache=cache, cache_index=0, want_values=False).logits ** 2) * 1e-3

    # jit: eager dispatch of the model's small ops was most of this test's time.
    (l1, g1), (l2, g2) = jax.jit(jax.value_and_grad(loss))(p), jax.jit(jax.value_and_grad(loss_via_cache))(p)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * (float(jnp.max(jnp.abs(b))) + 1e-8))


@pytest.mark.parametrize("k", [6, 7])  # even K: the 3-D views of the backward pass; odd: the plain products
def test_dense_equals_cast_and_multiply_in_values_and_gradients(k):
    """`dense` in bf16: the same values and gradients as casting to bf16 and multiplying; float32 is `x @ w`."""
    from glore_jax.models.layers import dense
    x = jax.random.normal(jax.random.key(0), (10, k))
    w = jax.random.normal(jax.random.key(1), (k, 5))
    g = jax.random.normal(jax.random.key(2), (10, 5))

    def plain(x, w):  # a 16-bit dot's own output and autodiff (rounded to bf16, as the model used it)
        return (x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32)

    def ours(x, w):
        return dense(x, w, jnp.bfloat16).astype(jnp.bfloat16).astype(jnp.float32)

    np.testing.assert_array_equal(np.asarray(ours(x, w)), np.asarray(plain(x, w)))
    got = jax.grad(lambda x, w: jnp.sum(ours(x, w) * g), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(plain(x, w) * g), argnums=(0, 1))(x, w)
    for name, a, e in zip("xw", got, want):
        assert a.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(e))),
                                   err_msg=f"d{name}")
    np.testing.assert_array_equal(np.asarray(dense(x, w, jnp.float32)), np.asarray(x @ w))


def test_bf16_train_step_keeps_every_weight_matmul_in_bf16_where_the_cpu_has_it():
    """On a CPU with native bf16, the bf16 train step runs every weight matmul and its two gradient
    products as bf16 x bf16 -> f32 dots; elsewhere XLA:CPU runs them in float32 (and the step still runs)."""
    import re
    from glore_jax import hardware, objectives
    from glore_jax.training import state as state_lib
    from glore_jax.training.config import TrainConfig
    cfg = M.preset("tiny", dtype="bfloat16")
    t = TrainConfig(total_steps=10, batch_size=2, grad_accum=1, learning_rate=1e-3, warmup_steps=0,
                    weight_decay=0.0, grad_clip=1.0, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=1,
                    max_to_keep=1, peak_tflops=0.0)
    step, state, mesh = state_lib.isolated_step(objectives.get("sft"), cfg, t)
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 16)).astype(np.int32)
    batch = {"tokens": tokens, "loss_mask": np.ones((2, 16), np.float32), "segment_ids": np.ones((2, 16), np.int32),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)).copy()}
    batch = {k: jax.device_put(v, shd.batch_sharding(mesh, 2)) for k, v in batch.items()}
    hlo = step.lower(state, batch).compile().as_text()
    # Operand types of every 2-D dot (the weight matmuls; attention's are batched, 4-D).
    types = []
    for comp in hlo.split("\n\n"):
        declared = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", comp))
        for out, a, b in re.findall(r"= \w+\[(\d+,\d+)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", comp):
            types.append((declared.get(a), declared.get(b)))
    # forward + two gradient products for each of 7 weight matmuls a layer and the LM head
    assert len(types) >= 3 * (7 * cfg.num_layers + 1), types
    native = bool(hardware.cpu_bf16_flags())
    assert set(types) == ({("bf16", "bf16")} if native else {("f32", "f32")}), types
    state, metrics = step(state, batch)
    assert bool(jnp.isfinite(metrics["loss"])) and int(state.step) == 1


def test_init_draws_are_those_every_recorded_run_started_from():
    """Golden values of the tiny preset's init at key 0 (jax 0.10.2, threefry).

    flax draws each param from its module's RNG in declaration order, so
    reordering `param` calls silently gives every seed another init, and every
    recorded result (README tables, results/) another starting point. A
    deliberate change of the draw must update these values and say so.
    """
    params = M.init_params(M.preset("tiny"), jax.random.key(0))
    attn = params["backbone"]["layers"]["attn"]
    want = {"q": [-0.006139915902167559, -0.020765064284205437, -0.0020355696324259043],
            "k": [-0.01126298401504755, -0.018836578354239464, -0.0028942690696567297],
            "v": [-0.01746998354792595, 0.0198686346411705, 0.005412643309682608],
            "o": [0.010231556370854378, 0.00648517208173871, -0.015021429397165775]}
    for name, values in want.items():
        np.testing.assert_allclose(np.asarray(attn[name]).ravel()[:3], values, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(params["backbone"]["layers"]["mlp"]["gate"]).ravel()[:2],
                               [0.006581898313015699, 0.009896776638925076], rtol=1e-6)


def _dot_flops(jaxpr) -> int:
    """2 x output size x contracted size of every dot_general in a jaxpr, sub-jaxprs included
    (a scan's body counted `length` times)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in lhs_contract]))
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    total += times * _dot_flops(inner)
    return total


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_is_three_times_the_forward_pass_matmuls(tied):
    # MFU divides by this count: a parameter that does no multiply (the input embedding's row gather)
    # would inflate it, as it did until 2026-12-04 (1.24x for a 2-layer model of LLaMA-2 7B widths).
    cfg = TINY.replace(tie_embeddings=tied)
    p = M.init_params(cfg, jax.random.key(0))
    b, t = 2, 12
    jaxpr = jax.make_jaxpr(lambda p, x: M.apply(cfg, p, x, want_values=False).logits)(p, _tokens(b, t)).jaxpr
    norms = (2 * cfg.num_layers + 1) * cfg.embed_dim  # scales: counted by the formula, no matmul
    assert cfg.flops_per_token(t) == 3 * _dot_flops(jaxpr) / (b * t) + 6 * norms
