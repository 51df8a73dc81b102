"""The decode hot path: a one-token forward with layers unrolled over per-layer cache buffers.

Training and prefill scan over the stacked `[L, ...]` params and cache
(`transformer.Backbone`): one compiled layer, whatever the depth. A decode step
is different. Inside a scan, reading layer l's slice of a stacked cache or
weight is a dynamic slice, and XLA:CPU materialises it as a copy before each
matmul or reduction, every step. On the demo preset that was ~40% of decode
time. Here each layer owns its buffers (`LayerCache` holds a tuple of per-layer
arrays), and the per-layer weights are split once before the loop
(`split_layers`), so a step reads every byte once and copies nothing.

The prefill (`prefill`) also runs its layers one by one, for another reason: a
sampler needs only the last prompt token's logits, so the last layer runs its
attention and MLP at that token alone (and its keys/values at every token):
about a fifth less work for the demo preset's four layers.

The layer math is the same `Block` module the scan runs, applied per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from glore_jax.models.config import ModelConfig
from glore_jax.models.layers import GATE_UP, QKV, Block, rope_angles
from glore_jax.models.params import Params
from glore_jax.models.transformer import CACHE_K_AXES, CACHE_V_AXES, Backbone, KVCache, LMHead

# Logical axes of one layer's k [B, KVH, D, S] and v [B, KVH, S, D] buffers.
LAYER_K_AXES, LAYER_V_AXES = CACHE_K_AXES[1:], CACHE_V_AXES[1:]


@flax.struct.dataclass
class LayerCache:
    """Keys/values per layer: k[l] [B, KVH, D, S], v[l] [B, KVH, S, D]; pos [B, S]: each slot's position (-1 = empty)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    pos: jax.Array

    @classmethod
    def from_stacked(cls, cache: KVCache) -> "LayerCache":
        """Splits a scanned `KVCache` (e.g. a prefill's) into per-layer buffers."""
        n = cache.k.shape[0]
        return cls(k=tuple(cache.k[i] for i in range(n)), v=tuple(cache.v[i] for i in range(n)), pos=cache.pos)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int) -> "LayerCache":
        stacked = KVCache.empty(config, batch, length)
        return cls(k=tuple(jnp.zeros_like(a) for a in stacked.k), v=tuple(jnp.zeros_like(a) for a in stacked.v),
                   pos=stacked.pos)

    @property
    def length(self) -> int:
        return self.pos.shape[1]

    def grow(self, length: int) -> "LayerCache":
        """The same slots plus empty ones up to `length`."""
        extra = length - self.length
        if extra < 0:
            raise ValueError(f"Cannot grow a cache of {self.length} slots to {length}")
        pad = lambda x, axis: jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])
        return LayerCache(k=tuple(pad(k, 3) for k in self.k), v=tuple(pad(v, 2) for v in self.v),
                          pos=jnp.pad(self.pos, [(0, 0), (0, extra)], constant_values=-1))


def split_layers(params: Params) -> tuple[Params, ...]:
    """The stacked `backbone/layers` params as one params tree per layer."""
    stacked = params["backbone"]["layers"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(n))


def decode_weights(config: ModelConfig, params: Params, *, split: bool = True
                   ) -> tuple[Params, tuple[Params, ...] | None]:
    """Params laid out for a decode loop: (params, per-layer params or None).

    Matmul weights are cast once to the compute dtype: the forward casts them
    at every use (`w.astype(dt)`), so this gives the same numbers without
    converting every weight at every step, which in bfloat16 cost more than
    the matmuls. Norm scales stay float32, as the forward keeps them.
    With `split`, each layer's weights become their own arrays, and the
    stacked copy is dropped from the returned params: this copies the layer
    weights once, and in exchange no step slices (on XLA:CPU, copies) them.
    Each layer's MLP gate and up are also stacked into one `GATE_UP` weight
    (see `MLP`). Without `split`, steps slice the stacked float32 weights as
    the scan does, and no weight is copied.
    """
    cast = lambda tree, min_ndim: jax.tree_util.tree_map(
        lambda a: a.astype(config.compute_dtype) if a.ndim >= min_ndim else a, tree)
    backbone = dict(params["backbone"])
    layers = backbone.pop("layers")
    top = cast({**params, "backbone": backbone}, 2)
    if not split:
        return {**top, "backbone": {**top["backbone"], "layers": layers}}, None

    def fuse(layer: Params) -> Params:
        mlp = dict(layer["mlp"])
        mlp[GATE_UP] = jnp.stack([mlp.pop("gate"), mlp.pop("up")], axis=1)
        attn = dict(layer["attn"])
        e = attn["q"].shape[0]
        attn[QKV] = jnp.concatenate([attn.pop(n).reshape(e, -1) for n in ("q", "k", "v")], axis=1)
        return {**layer, "mlp": mlp, "attn": attn}

    return top, tuple(fuse(cast(layer, 2)) for layer in split_layers({"backbone": {"layers": layers}}))


def _logits(config: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """The last layer's output [B, T, E] -> float32 logits [B, T, V] (final norm, then the LM head)."""
    backbone, bb = Backbone(config, parent=None), {"params": params["backbone"]}
    x = backbone.apply(bb, x, method=Backbone.finish)
    if config.tie_embeddings:
        return backbone.apply(bb, x, method=Backbone.attend)
    return LMHead(config, parent=None).apply({"params": params["lm_head"]}, x)


def prefill(config: ModelConfig, params: Params, prompts: jax.Array, lengths: jax.Array,
            layers: Sequence[Params] | None = None) -> tuple[LayerCache, jax.Array]:
    """prompts [B, P] right-padded, lengths [B] -> (a cache of their P slots, float32 logits [B, V] of each last token).

    The last layer's output is needed at each row's last token only, so it runs
    twice: once over every token for their keys and values (the rest of that
    call is dead code, which XLA drops), and once for the last token alone,
    reading the others' keys as a cached segment. The keys and values are the
    full forward's, bit for bit; the logits differ from it in rounding only
    (the last token's softmax is split over two segments; `test_sampling`).

    `layers`: each layer's params as arrays of their own (`split_layers`), for a
    caller that keeps them between calls; without them the layers are sliced
    from the stacked params here, and on XLA:CPU every slice is a copy of that
    weight at every call: ~13% of the demo preset's traced prefill kernel time;
    the two group prefills of a batch-64 call of 32-token prompts took 29.9
    against 27.6 ms (`sampling.Sampler` keeps them for data-parallel decode).
    The same numbers either way, bit for bit.
    """
    if "lm" not in config.heads:
        raise ValueError(f"prefill needs an 'lm' head; config.heads={config.heads}")
    c = config
    idx = jnp.arange(prompts.shape[1])[None, :]
    positions = jnp.where(idx < lengths[:, None], idx, -1).astype(jnp.int32)
    backbone = Backbone(c, parent=None)
    bb = {"params": params["backbone"]}
    x = backbone.apply(bb, prompts, method=Backbone.embed)
    rotary = rope_angles(positions, c.head_dim, c.rope_theta)
    layers = split_layers(params) if layers is None else layers
    block = lambda i, *args: Block(c, parent=None).apply({"params": layers[i]}, *args)  # noqa: E731
    ks, vs = [], []
    for i in range(len(layers)):
        y, (k, v) = block(i, x, None, positions, None, None, None, rotary)
        if i + 1 < len(layers):  # (the last layer's `y` is dead: only its keys are kept)
            x = y
        ks.append(k)
        vs.append(v)
    last = jnp.maximum(lengths - 1, 0).astype(jnp.int32)
    at_last = lambda a: jnp.take_along_axis(a, last.reshape((-1,) + (1,) * (a.ndim - 1)), axis=1)  # noqa: E731
    last_pos = at_last(positions)
    # The other tokens as context; the last token reads its own keys as this call's own segment.
    others = jnp.where(positions >= last_pos, -1, positions)
    x, _ = block(len(layers) - 1, at_last(x), ((ks[-1], vs[-1]),), last_pos, None, (others,), None,
                 tuple(at_last(r) for r in rotary))
    logits = _logits(c, params, x)
    return LayerCache(k=tuple(ks), v=tuple(vs), pos=positions), logits[:, 0]


def decode_step(config: ModelConfig, params: Params, layers: Sequence[Params], tokens: jax.Array,
                positions: jax.Array, cache: LayerCache, slot: jax.Array, *,
                prefix: LayerCache | None = None) -> tuple[jax.Array, LayerCache]:
    """tokens, positions [B, T] -> (float32 logits [B, T, V], `cache` with their keys at slots [slot, slot+T)).

    Every token attends to the filled slots of `prefix` (read-only; with fewer
    rows than B it is shared by consecutive query rows, see `Attention`) and of
    `cache`, its own keys included, at or before its position.
    """
    if "lm" not in config.heads:
        raise ValueError(f"decode_step needs an 'lm' head; config.heads={config.heads}")
    c = config
    cache = cache.replace(pos=jax.lax.dynamic_update_slice_in_dim(cache.pos, positions.astype(jnp.int32), slot, 1))
    reads = (() if prefix is None else (prefix,)) + (cache,)
    context_pos = tuple(r.pos for r in reads)
    backbone = Backbone(c, parent=None)
    bb = {"params": params["backbone"]}
    x = backbone.apply(bb, tokens, method=Backbone.embed)
    rotary = rope_angles(positions, c.head_dim, c.rope_theta)  # once for all layers
    ks, vs = [], []
    for i, layer in enumerate(layers):
        context = tuple((r.k[i], r.v[i]) for r in reads)
        x, (k, v) = Block(c, parent=None).apply({"params": layer}, x, context, positions, None, context_pos, slot,
                                                rotary)
        ks.append(k)
        vs.append(v)
    logits = _logits(c, params, x)
    return logits, cache.replace(k=tuple(ks), v=tuple(vs))
