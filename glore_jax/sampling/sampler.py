"""The jitted sampler: a batched prefill, then a `lax.while_loop` decode over explicit KV caches.

One batch goes through these compiled programs:
  prefill  prompts [Np, P] -> prefix cache + logits of each row's last prompt token
  start    logits -> SamplingState with the first new token chosen
  advance  SamplingState -> SamplingState, decoding until the suffix cache is full
           or every row stopped; `grow` adds slots to the suffix between phases

The cache has two parts, both explicit pytrees (`LayerCache`, one buffer per
layer, see `models.decoding`):
  prefix  the prompts' keys, written once by prefill and read-only afterwards;
          for K rollouts it holds each prefix once, shared by its K rows;
  suffix  the new tokens' keys, written one slot per step.
Sharing the prefix is what makes rollouts cheap: it is not re-prefilled, not
copied K times, and its K one-token queries read it as one matmul. Growing the
suffix in a few phases keeps every step's attention close to the filled slots,
as a growing cache would, while each phase stays one static-shape while_loop.
Prompts are right-padded; a pad slot carries position -1, which the attention
mask treats as empty.

On a mesh of several devices, a small model decodes data-parallel: each
device holds the whole (replicated) weights and runs its own while_loop over
its own rows under `shard_map`, with no collective at all. Sharding
its weights over 'fsdp' instead (the training layout) would gather them at
every step; one SPMD loop over all rows would synchronise the devices at
every step to decide whether all rows stopped. Big models (or a 'tensor'
axis) keep the rules table's layout and one SPMD loop. On a CPU host split
into one XLA device per core, a loop of few rows a device also compiles its
kernels to run on the device's own thread (`hardware.decode_compiler_options`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from glore_jax import hardware
from glore_jax import sharding as shd
from glore_jax.models import ModelConfig, param_shardings
from glore_jax.models.decoding import (LAYER_K_AXES, LAYER_V_AXES, LayerCache, decode_step, decode_weights, prefill,
                                      split_layers)
from glore_jax.sampling.kept import KeptForParams
from glore_jax.sampling.state import SamplingState, StopCondition, phase_widths
from glore_jax.sampling.strategy import SamplingStrategy, select


# Models up to this many float32 param bytes decode data-parallel (weights replicated on every device).
# 1 GiB fits beside its KV cache on any accelerator we target and on a CPU host, and it is the
# size below which gathering fsdp-sharded weights at every step costs more than holding a copy.
REPLICATE_PARAMS_MAX_BYTES = 1 << 30


def _specs(shardings):
    return jax.tree_util.tree_map(lambda s: s.spec, shardings)


def _row_keys(seed: jax.Array, row_ids: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(row_ids)


class Sampler:
    """Compiled sampling programs for one model config on one mesh.

    Batch rows are sharded over the mesh's data-parallel axes ('data', 'fsdp').
    `independent_rows` (default: on a mesh of several devices with tensor=1,
    for a model under REPLICATE_PARAMS_MAX_BYTES) replicates the params and
    decodes each device's rows in its own loop (see the module doc); otherwise
    params follow the rules table. With no mesh, everything runs on one device.
    `decode_phases`: how many times the suffix cache grows (each phase compiles
    once per shape bucket). `split_weights=False` keeps one copy of the weights
    and slices each layer's inside the step instead (see `models.decoding`).
    """

    def __init__(self, config: ModelConfig, *, mesh: Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] = shd.LOGICAL_RULES, pad_id: int = 0,
                 vocab_limit: int | None = None, decode_phases: int = 8, split_weights: bool = True,
                 independent_rows: bool | None = None):
        if "lm" not in config.heads:
            raise ValueError(f"Sampling needs an 'lm' head; config.heads={config.heads}")
        if decode_phases < 1:
            raise ValueError(f"decode_phases must be >= 1, got {decode_phases}")
        self.config = config
        self.mesh = mesh if mesh is not None else shd.single_device_mesh()
        self.rules = rules
        self.pad_id = pad_id
        self.decode_phases = decode_phases
        self.split_weights = split_weights
        # Embedding rows past the tokenizer's vocab (padded for even sharding)
        # have no piece; they are never sampled.
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < config.vocab_size else None
        m, r = self.mesh, rules
        self.batch_multiple = int(m.shape["data"] * m.shape["fsdp"])
        self.independent_rows = self._resolve_independent_rows(independent_rows)
        trained = param_shardings(config, m, r)
        # The params' decode layout; `_place` moves the training layout there once per set of params (`_decode_params`).
        params = jax.tree_util.tree_map(lambda _: shd.replicated(m), trained) if self.independent_rows else trained
        self.param_shardings = params
        self._place = jax.jit(lambda p: p, in_shardings=(trained,), out_shardings=params)
        self._kept = KeptForParams()  # the decode layout of the params last called with (`_decode_params`)
        row, rows2 = shd.batch_sharding(m, 1, r), shd.batch_sharding(m, 2, r)
        per_layer = lambda axes: (shd.logical_sharding(axes, m, r),) * config.num_layers
        cache = LayerCache(k=per_layer(LAYER_K_AXES), v=per_layer(LAYER_V_AXES), pos=rows2)
        scalar = shd.replicated(m)
        # One step counter per decode loop: per device (each its own) for data-parallel decode.
        self.loops = self.batch_multiple if self.independent_rows else 1
        state = SamplingState(suffix=cache, tokens=rows2, logprobs=rows2, num_generated=row, done=row,
                              position=row, keys=row, step=row if self.independent_rows else scalar, limit=scalar)
        self._row, self._rows2 = row, rows2
        self._cache_shardings, self._state_shardings = cache, state

        self.prefill = jax.jit(self._prefill, in_shardings=(params, rows2, row), out_shardings=(cache, rows2))
        # Data-parallel samplers keep each layer's params split off the stacked ones (`_decode_params`),
        # so that their prefill slices (on XLA:CPU, copies) no weight at every call; all replicated.
        rep = shd.replicated(m)
        self._prefill_split = jax.jit(self._prefill_with_layers, in_shardings=(rep, rep, rows2, row),
                                      out_shardings=(cache, rows2))
        self._split_layers = jax.jit(split_layers, out_shardings=rep)
        # Output shardings follow the input's: a cast keeps them, and taking
        # layer i of the unsharded 'layers' axis keeps the other axes' split.
        self.weights = jax.jit(functools.partial(decode_weights, config, split=split_weights),
                               in_shardings=(params,))
        self.start = jax.jit(self._start, static_argnums=(5, 6, 7, 8, 9),
                             in_shardings=(rows2, row, row, scalar, scalar), out_shardings=state)
        self.grow = jax.jit(lambda s, width: s.replace(suffix=s.suffix.grow(width)), static_argnums=(1,),
                            in_shardings=(state,), out_shardings=state)
        # The state is donated: its suffix cache is the buffer the loop writes
        # every step, and donation lets XLA update it in place across calls
        # instead of holding an input and an output copy at once.
        advance = self._advance_each_device if self.independent_rows else self._advance
        compile_advance = lambda options: jax.jit(advance, static_argnums=(4, 5), donate_argnums=(3,),  # noqa: E731
                                                  in_shardings=(None, None, cache, state), out_shardings=state,
                                                  compiler_options=options)
        self.advance = compile_advance(None)
        # Loops of few rows a device on a CPU host of one device per core run each device's kernels on its own
        # thread, with options that depend on the compute dtype (`hardware.decode_compiler_options`):
        # data-parallel loops have no collective to wait on.
        per_core = (hardware.decode_compiler_options(list(m.devices.flat), jnp.dtype(config.compute_dtype).name)
                    if self.independent_rows else None)
        self._advance_few_rows = compile_advance(per_core) if per_core else self.advance
        # Groups' states (`group_size`) as one, each device joining its own rows (see `_group_rows`).
        self._join = jax.jit(self._join_each_device, out_shardings=state)

    def _resolve_independent_rows(self, asked: bool | None) -> bool:
        m = self.mesh
        if m.devices.size == 1 or asked is False:
            return False  # (on one device the two layouts are the same program)
        if m.shape["tensor"] > 1:
            if asked:
                raise ValueError(f"independent_rows needs a mesh with tensor=1, got {dict(m.shape)}")
            return False
        return bool(asked) or 4 * self.config.num_params() <= REPLICATE_PARAMS_MAX_BYTES

    # ----- the compiled programs -----

    def _prefill(self, params, prompts: jax.Array, lengths: jax.Array, layers=None) -> tuple[LayerCache, jax.Array]:
        """prompts [B, P] right-padded, lengths [B] -> (prefix cache of P slots, last logits [B, V]).

        `layers`: each layer's params split off (`models.decoding.prefill`), or None to slice them here."""
        with shd.activation_rules(self.mesh, self.rules):
            return prefill(self.config, params, prompts, lengths, layers)

    def _prefill_with_layers(self, params, layers, prompts: jax.Array, lengths: jax.Array):
        return self._prefill(params, prompts, lengths, layers)

    def _start(self, logits: jax.Array, lengths: jax.Array, row_ids: jax.Array, seed: jax.Array,
               limit: jax.Array, max_new: int, share: int, width: int, strategy: SamplingStrategy,
               stop: StopCondition) -> SamplingState:
        """Chooses each row's first token; with share=K, prefix row n starts rows n*K .. n*K+K-1."""
        logits, lengths = jnp.repeat(logits, share, axis=0), jnp.repeat(lengths, share, axis=0)
        b = logits.shape[0]
        keys = _row_keys(seed, row_ids)
        tok, lp = select(self._limit(logits), jax.vmap(jax.random.fold_in, (0, None))(keys, 0), strategy)
        tokens = jnp.full((b, max_new), self.pad_id, jnp.int32).at[:, 0].set(tok)
        logprobs = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(lp)
        return SamplingState(suffix=LayerCache.empty(self.config, b, width), tokens=tokens, logprobs=logprobs,
                             num_generated=jnp.ones((b,), jnp.int32), done=stop.is_stop(tok) | (limit <= 1),
                             position=lengths.astype(jnp.int32), keys=keys, step=jnp.ones((self.loops,), jnp.int32),
                             limit=jnp.asarray(limit, jnp.int32))

    def _advance(self, params, layers, prefix: LayerCache, state: SamplingState, strategy: SamplingStrategy,
                 stop: StopCondition) -> SamplingState:
        """Decodes until every row stopped, the limit is reached, or the suffix has no free slot."""
        width = state.suffix.length

        def cond(s: SamplingState):
            step = s.step[0]  # this loop's counter (of one, or of this device's under `shard_map`)
            return (step < s.limit) & (step <= width) & ~jnp.all(s.done)

        def body(s: SamplingState) -> SamplingState:
            # Step s feeds new token s-1 (whose keys go to suffix slot s-1) and chooses token s.
            step = s.step[0]
            last = jax.lax.dynamic_index_in_dim(s.tokens, step - 1, axis=1, keepdims=True)
            pos = s.position[:, None]
            with self._rules_inside_loop():
                per_layer = layers if layers is not None else split_layers(params)
                logits, suffix = decode_step(self.config, params, per_layer, last, pos, s.suffix, step - 1,
                                             prefix=prefix)
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, step)
            tok, lp = select(self._limit(logits[:, 0]), step_keys, strategy)
            tok = jnp.where(s.done, self.pad_id, tok)
            lp = jnp.where(s.done, 0.0, lp)
            return s.replace(
                suffix=suffix,
                tokens=jax.lax.dynamic_update_index_in_dim(s.tokens, tok, step, axis=1),
                logprobs=jax.lax.dynamic_update_index_in_dim(s.logprobs, lp, step, axis=1),
                num_generated=s.num_generated + (~s.done).astype(jnp.int32),
                done=s.done | stop.is_stop(tok) | (step + 1 >= s.limit),
                position=s.position + 1,
                step=s.step + 1,
            )

        return jax.lax.while_loop(cond, body, state)

    def _advance_each_device(self, params, layers, prefix: LayerCache, state: SamplingState,
                             strategy: SamplingStrategy, stop: StopCondition) -> SamplingState:
        """`_advance`, each device on its own rows with its own loop and step counter: no collective at all.

        A device whose rows all stopped exits early and keeps its own `step`; the
        next phase resumes each device from its own. No collective, not even one
        after the loop: XLA:CPU starts the programs whose inputs are ready in any
        order on each device, so two calls in flight that each ended in one (the
        `pmax` of a replicated step, before 2026-12) could wait on each other forever.
        """
        prefix_specs, state_specs = _specs(self._cache_shardings), _specs(self._state_shardings)
        local = lambda *arrays: self._advance(*arrays, strategy, stop)  # noqa: E731
        # check_vma=False: the while_loop's type check counts the size-1 'tensor' axis as varying in the
        # body's output (from the replicated weights) but not in its input carry, and refuses the loop.
        return jax.shard_map(local, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec(), prefix_specs,
                                                              state_specs), out_specs=state_specs,
                             check_vma=False)(params, layers, prefix, state)

    def _join_each_device(self, states: Sequence[SamplingState]) -> SamplingState:
        """Groups' states as one: each device concatenates its own rows of the groups, in order.

        `_group_rows` gives each group a slice of every device's rows, so the result
        is the rows in their order with no data moved between devices (and no
        collective, as in `_advance_each_device`); `step` is each device's longest loop.
        """
        specs = _specs(self._state_shardings)

        def local(*states):
            joined = jax.tree_util.tree_map(lambda *xs: xs[0] if xs[0].ndim == 0 else jnp.concatenate(xs), *states)
            return joined.replace(step=functools.reduce(jnp.maximum, [s.step for s in states]))
        return jax.shard_map(local, mesh=self.mesh, in_specs=(specs,) * len(states), out_specs=specs,
                             check_vma=False)(*states)

    def _rules_inside_loop(self):
        # Inside shard_map each device sees its own rows: no mesh-level sharding constraint applies.
        return contextlib.nullcontext() if self.independent_rows else shd.activation_rules(self.mesh, self.rules)

    def _limit(self, logits: jax.Array) -> jax.Array:
        if self.vocab_limit is None:
            return logits
        return jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)

    # ----- host-side entry points -----

    def put_rows(self, x) -> jax.Array:
        """Places a host array [B, ...] on the mesh with its batch dimension sharded."""
        # From host memory, each process placing its own shards: the same call works when the
        # mesh spans processes (multi-host sampling), where a device_put of one array cannot.
        x = np.asarray(x)
        sharding = self._rows2 if x.ndim == 2 else self._row
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def sample(self, params, prompts, lengths, *, max_new: int, strategy: SamplingStrategy,
               stop: StopCondition, seed: int = 0, row_ids=None, limit: int | None = None) -> SamplingState:
        """Samples continuations of right-padded `prompts` [B, P] with true `lengths` [B].

        B must be a multiple of the mesh's batch-parallel size (pad with dummy rows).
        `row_ids` [B] name each row's random stream (default 0..B-1).
        """
        prompts, lengths = np.asarray(prompts), np.asarray(lengths)
        row_ids = np.arange(prompts.shape[0]) if row_ids is None else np.asarray(row_ids)
        return self._decode_in_groups(params, prompts, lengths, row_ids, 1, seed, max_new, strategy, stop, limit)

    def rollouts(self, params, prefixes, lengths, *, k: int, max_new: int, strategy: SamplingStrategy,
                 stop: StopCondition, seed: int = 0, share_prefix: bool = True,
                 limit: int | None = None) -> SamplingState:
        """N prefixes [N, P] -> N*K continuations; row n*K+j is rollout j of prefix n.

        share_prefix=True prefills each prefix once and its K rollouts read that
        one cache; False prefills N*K copies (the naive baseline). Both use the
        same per-row keys, so they produce the same tokens.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        prefixes, lengths = np.asarray(prefixes), np.asarray(lengths)
        row_ids = np.arange(prefixes.shape[0] * k)
        if not share_prefix:
            prefixes, lengths, k = np.repeat(prefixes, k, 0), np.repeat(lengths, k), 1
        if self.independent_rows and prefixes.shape[0] % self.batch_multiple:
            # Each device's rows must read its own prefixes: row n*K+j sits on the device of prefix n.
            raise ValueError(f"rollouts on {self.batch_multiple} devices need a multiple of "
                             f"{self.batch_multiple} prefixes, got {prefixes.shape[0]} (pad with dummy prefixes)")
        return self._decode_in_groups(params, prefixes, lengths, row_ids, k, seed, max_new, strategy, stop, limit)

    def group_size(self, prompts: int, share: int = 1) -> int:
        """How many of `prompts` (each starting `share` rows) one decode loop takes at a time.

        All of them, except where `hardware.DECODE_GROUP_MAX_ROWS` says that a per-core CPU loop
        of their rows decodes faster as groups of DECODE_PER_CORE_MAX_ROWS rows a device.
        """
        m, rows = self.batch_multiple, prompts * share
        few = m * hardware.DECODE_PER_CORE_MAX_ROWS
        per_group = few // share // m * m  # whole prompts, a multiple of the devices on each
        if (self._advance_few_rows is self.advance or not few < rows <= m * hardware.DECODE_GROUP_MAX_ROWS
                or per_group < m or prompts % m):
            return prompts
        return per_group

    def _group_rows(self, prompts: int, size: int) -> list[np.ndarray]:
        """The prompts of each group of `size`: the same slice of every device's block of prompts.

        Device d holds prompts d*n/m .. (d+1)*n/m - 1 of a call; group g takes each
        device's g-th slice of them, so every device joins its own rows (`_join_each_device`).
        """
        m = self.batch_multiple
        if size >= prompts:
            return [np.arange(prompts)]
        per_device, step = prompts // m, size // m
        return [np.concatenate([d * per_device + np.arange(g, min(g + step, per_device)) for d in range(m)])
                for g in range(0, per_device, step)]

    def _decode_in_groups(self, params, prompts, lengths, row_ids, share, seed, max_new, strategy, stop, limit):
        run_prefill, weights = self._decode_params(params)
        groups = self._group_rows(prompts.shape[0], self.group_size(prompts.shape[0], share))
        states = []
        for chosen in groups:
            rows = (chosen[:, None] * share + np.arange(share)).reshape(-1)
            part = self.put_rows(prompts[chosen]), self.put_rows(lengths[chosen])
            prefix, logits = run_prefill(*part)
            states.append(self._run(weights, prefix, logits, part[1], share, self.put_rows(row_ids[rows]), seed,
                                    max_new, strategy, stop, limit))
        return states[0] if len(states) == 1 else self._join(states)

    def _decode_params(self, params):
        """The prefill bound to `params` in their decode layout, and the decode loop's weights made from them.

        Data-parallel decode gathers the fsdp-split weights onto every device and recasts and splits
        them per layer: 10.8 ms a call for the 3.7M `demo` preset on two CPU devices, 10-30% of a
        32-token call, while a pipeline stage samples hundreds of chunks with one set of params. So the
        result is kept for the next call with the same params (`KeptForParams`), the prefill's layers
        split off the stacked ones as well (`models.decoding.prefill`). Only data-parallel samplers keep
        it: their models are under REPLICATE_PARAMS_MAX_BYTES, and their gather is the cost; a big
        sharded model's extra copy is not worth ~2 ms a call.
        """
        if not self.independent_rows:
            return functools.partial(self.prefill, params), self.weights(params)
        return self._kept.get(params, self._decode_layout)

    def _decode_layout(self, params):
        # One host copy of each replicated array for all the CPU devices (`shd.share_host_replicas`).
        placed = shd.share_host_replicas(self._place(params))
        top = {**placed, "backbone": {k: v for k, v in placed["backbone"].items() if k != "layers"}}
        layers = shd.share_host_replicas(self._split_layers(placed))
        return functools.partial(self._prefill_split, top, layers), shd.share_host_replicas(self.weights(placed))

    def _run(self, weights, prefix, logits, lengths, share, row_ids, seed, max_new, strategy, stop, limit):
        if max_new < 1:
            raise ValueError(f"max_new must be >= 1, got {max_new}")
        limit = max_new if limit is None else min(limit, max_new)
        seed = jnp.asarray(int(seed) % 2**32, jnp.uint32)  # any Python int names a stream
        widths = phase_widths(max_new, self.decode_phases)
        state = self.start(logits, lengths, row_ids, seed, jnp.asarray(limit, jnp.int32), max_new, share,
                           widths[0] if widths else 0, strategy, stop)
        params, layers = weights
        advance = self.advance_program(state.tokens.shape[0])
        for i, width in enumerate(widths):
            if i:
                state = self.grow(state, width)
            state = advance(params, layers, prefix, state, strategy, stop)
        return state

    def advance_program(self, rows: int):
        """The compiled decode loop that `rows` rows (over the whole mesh) run: `advance`, or its per-core form."""
        few = -(-rows // self.batch_multiple) <= hardware.DECODE_PER_CORE_MAX_ROWS
        return self._advance_few_rows if few else self.advance


@functools.lru_cache(maxsize=16)
def sampler_for(config: ModelConfig, mesh: Mesh | None = None, pad_id: int = 0,
                vocab_limit: int | None = None) -> Sampler:
    """One Sampler (and so one set of compiled programs) per config, mesh and vocab."""
    return Sampler(config, mesh=mesh, pad_id=pad_id, vocab_limit=vocab_limit)

