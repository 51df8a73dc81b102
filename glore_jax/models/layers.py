"""Llama-family building blocks: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP.

Every param is created with logical axis names (see `glore_jax.sharding`), and
every key activation is constrained with logical names, so one rules table
decides the parallel layout. Params are float32; matmuls run in the config's
compute dtype; norms, softmax and rotary phases stay in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glore_jax.models.attention_core import NEG_INF, attention_mask, causal_self_attention, joint_softmax
from glore_jax.models.config import ModelConfig
from glore_jax.sharding import constrain

_INIT = nn.initializers.normal(stddev=0.02)


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
          init=_INIT) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


# The one parameter layout is q/k/v/o in attention and `gate`/`up`/`down` in the
# MLP: what init, training, checkpoints and HF conversion all see. `qkv`
# [E, (H + 2 KVH) D] and `gate_up` [E, 2, F] are not a second layout but views
# `decoding.decode_weights` derives inside the sampler and never saves: at
# decode's few rows one fused matmul runs faster than several on XLA:CPU
# (gate/up ~1.7x; q/k/v ~7% of a demo-preset decode step at batch 64), while
# training keeps the separate weights its scan and backward were tuned on.
# `test_models` checks that both paths agree.
GATE_UP = "gate_up"
QKV = "qkv"


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(self.dtype)


def dense(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x [N, K] @ w [K, M] with both operands in `dtype`; returns the float32 accumulation.

    In float32 this is `x @ w`. For a 16-bit `dtype`, why not simply cast and
    multiply: XLA:CPU runs a dot whose *result* is 16-bit by converting both
    operands to float32 first, and autodiff of a dot with a float32 result
    multiplies the float32 cotangent by the 16-bit operand, in float32 again.
    Measured on a 2-core AMD EPYC with AVX512-BF16 (2026-12-01), a bf16 "train
    step" therefore ran every matmul in float32, plus the conversions, and was
    slower than the float32 step. Here the forward product and both backward
    products are 16-bit x 16-bit -> float32, the form XLA:CPU hands to YNNPACK's
    native kernels (~750-850 against ~400 GFLOP/s for float32, [5632, 128] x
    [128, 384]). The cotangent is rounded to `dtype` before its two products, as
    in a 16-bit dot's own gradient, so values equal the cast-and-multiply form's.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return x.astype(jnp.float32) @ w.astype(jnp.float32)
    return _dense_16bit(x.astype(dtype), w.astype(dtype))


@jax.custom_vjp
def _dense_16bit(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _dense_16bit_fwd(x, w):
    return _dense_16bit(x, w), (x, w)


def _dense_16bit_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    # Chosen when lowering, for the platform compiled for (AOT compiles for TPU run on a CPU host).
    dx, dw = jax.lax.platform_dependent(x, w, g, cpu=_dense_grads_cpu, default=_dense_grads)
    return dx.astype(x.dtype), dw.astype(w.dtype)


def _dense_grads(x, w, g):
    """dx = g w^T and dw = x^T g, 16-bit operands, float32 accumulation: native on TPU and GPU."""
    return (jnp.dot(g, w.T, preferred_element_type=jnp.float32),
            jnp.dot(x.T, g, preferred_element_type=jnp.float32))


def _dense_grads_cpu(x, w, g):
    """The same products, each with its transposed operand materialised through a 3-D view.

    A plain `w.T` reaches XLA:CPU as a column-major layout (or is folded into
    the dot's dimensions), which its YNNPACK dots reject, and the dot then runs
    in float32 like any other. An odd inner size has no such view: plain form.
    """
    (n, k), m = x.shape, w.shape[1]
    if k % 2:
        return _dense_grads(x, w, g)
    contract = lambda a, b, i: jax.lax.dot_general(a, b, (((i,), (0,)), ((), ())),  # noqa: E731
                                                   preferred_element_type=jnp.float32)
    return (contract(g, w.reshape(2, k // 2, m).transpose(2, 0, 1), 1).reshape(n, k),
            contract(x.reshape(n, 2, k // 2).transpose(1, 2, 0), g, 2).reshape(k, m))


_dense_16bit.defvjp(_dense_16bit_fwd, _dense_16bit_bwd)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """The rotary factors (cos, signed sin), each float32 [B, T, 1, head_dim], for `apply_rope`.

    Full width, as [cos, cos] and [-sin, sin] over the two halves, so that
    `apply_rope` is two products and a sum with no concatenation. Computed
    once per forward and shared by every layer's q and k.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    phase = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(phase), jnp.sin(phase)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1)


def apply_rope(x: jax.Array, rotary: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding, half-split convention (as in HF Llama). x: [B, T, N, D]; rotary: `rope_angles`.

    out = x * cos + swap_halves(x) * sin, with the sign in `sin`: the same
    numbers as [x1 cos - x2 sin, x2 cos + x1 sin], without splitting x and
    concatenating the halves, which XLA:CPU ran as slow concatenate fusions
    (a decode step of the demo preset: 9-12% faster this way, alternating runs).
    """
    cos, sin = rotary
    x32 = x.astype(jnp.float32)
    swapped = jnp.flip(x32.reshape(*x.shape[:-1], 2, x.shape[-1] // 2), axis=-2).reshape(x.shape)
    return (x32 * cos + swapped * sin).astype(x.dtype)


def write_slots(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """`buf` with `new` written at `index` along `axis`, in place when XLA can.

    A 16-bit float buffer is written through a same-width integer view: for a
    bfloat16 dynamic-update-slice, XLA:CPU converts the whole buffer to
    float32 and back to write one slot (a quarter of a bfloat16 decode step on
    the demo preset). The bits written are the same.
    """
    new = new.astype(buf.dtype)
    if jnp.issubdtype(buf.dtype, jnp.floating) and buf.dtype.itemsize == 2:
        view = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
        out = jax.lax.dynamic_update_slice_in_dim(view(buf), view(new), index, axis)
        return jax.lax.bitcast_convert_type(out, buf.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buf, new, index, axis)




class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 context: tuple | None, context_pos: tuple | None, write_slot: jax.Array | None = None,
                 rotary: tuple[jax.Array, jax.Array] | None = None):
        """x: [B, T, E]; rotary: `rope_angles(positions)`, computed here if None; context: cached (k, v) segments, k [Bs, KVH, D, S] and v [Bs, KVH, S, D].

        Attends jointly (one softmax) over every context segment, whose slots are
        visible by `context_pos` ([Bs, S] each, -1 = empty), and this call's own
        tokens. A segment with Bs < B rows is shared: its row n serves query rows
        n*r .. n*r+r-1 (r = B // Bs). That is how K rollouts read one copy of
        their prefix, and it turns their K one-token queries into one matmul.

        Without `write_slot`, the context is read-only and this returns (out
        [B, T, E], this call's (k [B, KVH, D, T], v [B, KVH, T, D])) for the
        caller to store.
        With it, this call's keys are first written into the last segment at
        that slot (whose `context_pos` must already hold their positions), then
        read from there, and the updated last segment is returned instead.
        Writing before reading is what lets XLA update a while-loop's cache in
        place: a read of the old buffer after the write would force a copy.
        """
        c = self.config
        dt = c.compute_dtype
        b, t, e = x.shape
        # Projections on [B*T, E] rows (see `MLP`): the 3-D einsums' backward was slower on XLA:CPU.
        x2 = x.astype(dt).reshape(b * t, e)
        if self.has_variable("params", QKV):
            # The decode layout (`decoding.decode_weights`): q, k and v side by side, one matmul.
            qkv = dense(x2, self.get_variable("params", QKV), dt).astype(dt)
            sizes = np.cumsum([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim])
            q, k, v = (a.reshape(b, t, -1, c.head_dim) for a in jnp.split(qkv, sizes, axis=-1))
        else:
            # Declared in this order (q, k, v, o) because flax draws each param's init from the
            # module's RNG in declaration order: another order is another init for the same seed.
            wq = param(self, "q", (c.embed_dim, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"))
            wk = param(self, "k", (c.embed_dim, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
            wv = param(self, "v", (c.embed_dim, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
            project = lambda w: dense(x2, w.reshape(e, -1), dt).astype(dt).reshape(b, t, w.shape[1], w.shape[2])  # noqa: E731
            q, k, v = project(wq), project(wk), project(wv)
        wo = param(self, "o", (c.num_heads, c.head_dim, c.embed_dim), ("heads", "head_dim", "embed"))
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads",
                          "activation_head_dim"))
        if rotary is None:
            rotary = rope_angles(positions, c.head_dim, c.rope_theta)
        q, k = apply_rope(q, rotary), apply_rope(k, rotary)

        d = q.shape[-1]
        kvh, g = c.num_kv_heads, c.num_heads // c.num_kv_heads
        qg = q.reshape(b, t, kvh, g, d) * jnp.asarray(d ** -0.5, dt)

        # Batch and head dims lead, so the cache is read without a transpose.
        # Keys are stored [B, KVH, D, S], slots minor: scores are then a plain
        # matmul q[G, D] @ k[D, S] per (row, head), which a one-token decode
        # step runs ~2x faster than a product-and-reduce over D against
        # [S, D] keys (measured in-loop, demo preset, XLA:CPU). Values stay
        # [B, KVH, S, D], the layout their mix wants.
        k = k.transpose(0, 2, 3, 1)
        v = v.transpose(0, 2, 1, 3)

        context, returned = list(context or ()), (k, v)
        if write_slot is not None:
            ck, cv = context[-1]
            context[-1] = returned = (write_slots(ck, k, write_slot, 3), write_slots(cv, v, write_slot, 2))

        def rows_to_segment(x, bs):
            """[B, KVH, G, T, X] -> [Bs, KVH, R*G*T, X]: a shared segment row's R query rows, stacked."""
            x = x.reshape(bs, b // bs, kvh, g * t, x.shape[-1]).swapaxes(1, 2)
            return x.reshape(bs, kvh, -1, x.shape[-1])

        def segment_to_rows(x, bs):
            """[Bs, KVH, R*G*T, X] -> [B, KVH, G, T, X] (the inverse)."""
            x = x.reshape(bs, kvh, b // bs, g * t, x.shape[-1]).swapaxes(1, 2)
            return x.reshape(b, kvh, g, t, x.shape[-1])

        # Every product is one batched matmul per (segment row, kv head), with
        # all the queries that read that row (its R sharing rows x G grouped
        # heads x T tokens) as the matmul's rows, in float32 accumulation.
        queries = qg.transpose(0, 2, 3, 1, 4)  # [B, KVH, G, T, D]
        segments = []
        for (ck, cv), cpos in zip(context, context_pos or ()):
            cpos = jnp.repeat(cpos, b // cpos.shape[0], axis=0) if cpos.shape[0] != b else cpos
            segments.append((ck, cv, attention_mask(positions, cpos, None, None, c.sliding_window)))
        if write_slot is None:
            segments.append((k, v, attention_mask(positions, positions, segment_ids, segment_ids,
                                                  c.sliding_window)))
        if len(segments) == 1 and write_slot is None:
            # No cache (training, prefill): one segment, through the hand-differentiated core.
            out = causal_self_attention(queries, k.astype(dt), v.astype(dt), segments[0][2])
        else:
            s_all = []
            for sk, _, mask in segments:
                bs = sk.shape[0]
                s = jnp.einsum("nkmd,nkds->nkms", rows_to_segment(queries, bs), sk.astype(dt),
                               preferred_element_type=jnp.float32)
                s_all.append(jnp.where(mask[:, None, None], segment_to_rows(s, bs), NEG_INF))
            out = 0.0
            for (_, sv, _), p in zip(segments, joint_softmax(s_all)):
                bs = sv.shape[0]
                probs = rows_to_segment(p.astype(dt), bs)
                mixed = jnp.einsum("nkms,nksd->nkmd", probs, sv.astype(dt), preferred_element_type=jnp.float32)
                out = out + segment_to_rows(mixed, bs)
        out = out.astype(dt).transpose(0, 3, 1, 2, 4)  # [B, T, KVH, G, D]
        out = constrain(out.reshape(b, t, c.num_heads, d),
                        ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        # A plain [B, T, H*D] @ [H*D, E] matmul: as a two-axis contraction,
        # XLA:CPU chose to transpose `wo` inside the decode loop at every step.
        out = dense(out.reshape(b * t, c.num_heads * d), wo.reshape(c.num_heads * d, c.embed_dim), dt).astype(dt)
        return constrain(out.reshape(b, t, e), ("activation_batch", "activation_length", "activation_embed")), returned


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dt = c.compute_dtype
        b, t, e = x.shape
        # Matmuls on [B*T, E] rows, not [B, T, E]: XLA:CPU's backward of the
        # 3-D form ran ~2x slower (transposes around every dot), see README.
        x = x.astype(dt).reshape(b * t, e)
        if self.has_variable("params", GATE_UP):
            # The decode layout (`decoding.decode_weights`): gate and up stacked
            # [E, 2, F] are one matmul, which at decode's few rows runs ~1.7x
            # faster than two. The stacked axis is unsharded, so each tensor
            # shard holds matching gate and up columns.
            gate_up = self.get_variable("params", GATE_UP)
            gu = dense(x, gate_up.reshape(e, -1), dt).astype(dt).reshape(b * t, 2, -1)
            g, u = gu[:, 0], gu[:, 1]
        else:
            g = dense(x, param(self, "gate", (c.embed_dim, c.mlp_dim), ("embed", "mlp")), dt).astype(dt)
            u = dense(x, param(self, "up", (c.embed_dim, c.mlp_dim), ("embed", "mlp")), dt).astype(dt)
        down = param(self, "down", (c.mlp_dim, c.embed_dim), ("mlp", "embed"))
        h = jax.nn.silu(g) * u
        h = constrain(h.reshape(b, t, -1), ("activation_batch", "activation_length", "activation_mlp"))
        out = dense(h.reshape(b * t, -1), down, dt).astype(dt)
        return constrain(out.reshape(b, t, e), ("activation_batch", "activation_length", "activation_embed"))


class Block(nn.Module):
    """One pre-norm decoder layer; scanned over depth by the backbone."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: tuple | None, positions: jax.Array,
                 segment_ids: jax.Array | None, context_pos: tuple | None, write_slot: jax.Array | None = None,
                 rotary: tuple[jax.Array, jax.Array] | None = None):
        """context: this layer's cached (k, v) segments; context_pos: their slot positions; rotary: see Attention."""
        c = self.config
        h, kv = Attention(c, name="attn")(RMSNorm(c.norm_eps, c.compute_dtype, name="attn_norm")(x),
                                          positions, segment_ids, context, context_pos, write_slot, rotary)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.norm_eps, c.compute_dtype, name="mlp_norm")(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed")), kv
