"""The jitted sampler: exactness against argmax loops and transformers, sharding, stops, rollouts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glore_jax import convert
from glore_jax import models as M
from glore_jax import sampling as S
from glore_jax import sharding as shd
from glore_jax.models import decoding
from glore_jax.models.decoding import LAYER_K_AXES, LAYER_V_AXES
from tests.hf_reference import make_tiny_hf_llama

TINY = M.preset("tiny")
PROMPTS = [[5, 17, 200, 3], [9], [44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54], [100, 101]]


@pytest.fixture(scope="module")
def params():
    # Widen the random init so greedy choices are not near-ties.
    p = M.init_params(TINY, jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim > 1 else x, p)


@functools.partial(jax.jit, static_argnums=0)
def _argmax_at(config, params, tokens, i):
    return jnp.argmax(M.policy_logits(config, params, tokens)[0, i])


def _argmax_loop(config, params, prompt, n, width=32):
    # The full forward over a right-padded row of one width, read at the last real token (causal: the
    # padding after it is invisible): one compile, where eager dispatch was most of the test's time.
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(_argmax_at(config, params, jnp.array([seq + [0] * (width - len(seq))]), len(seq) - 1)))
    return seq[len(prompt):]


def test_greedy_equals_argmax_loop_on_ragged_prompts(params):
    out = S.generate(TINY, params, PROMPTS, 12)
    assert out == [_argmax_loop(TINY, params, p, 12) for p in PROMPTS]


def test_greedy_equals_transformers_generate(tmp_path):
    import torch
    hf = make_tiny_hf_llama(tmp_path, tie=False, seed=1)
    cfg, params = convert.from_hf(str(tmp_path))
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])   # left-padded, as HF expects
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[:, width:].tolist()
    ours = S.generate(cfg, params, PROMPTS, 16)
    assert ours == ref


def test_same_results_on_one_device_and_eight_device_mesh(params):
    mesh = shd.make_mesh((2, 2, 2))
    sharded = M.shard_params(TINY, params, mesh)
    for temperature in (0.0, 1.0):
        one = S.generate(TINY, params, PROMPTS, 10, temperature=temperature, seed=4)
        eight = S.generate(TINY, sharded, PROMPTS, 10, temperature=temperature, seed=4, mesh=mesh)
        assert one == eight
    sampler = S.sampler_for(TINY, mesh)
    toks, lens = S.pad_prompts(PROMPTS * 2, TINY.vocab_size, rows=8, length=16)
    state = sampler.sample(sharded, toks, lens, max_new=8, strategy=S.SamplingStrategy(),
                           stop=S.StopCondition())
    assert state.tokens.sharding.spec == shd.logical_to_spec(("activation_batch", None))
    assert all(len(k.sharding.device_set) == 8 for k in state.suffix.k)
    assert state.suffix.k[0].sharding.spec == shd.logical_to_spec(LAYER_K_AXES)
    assert state.suffix.v[0].sharding.spec == shd.logical_to_spec(LAYER_V_AXES)


def test_data_parallel_decode_equals_one_device_when_devices_stop_at_different_steps(params):
    """A small model decodes with replicated weights, one loop per device (`independent_rows`).

    One row per device and an EOS that ends rows at different steps: devices
    leave their loops at different steps, across decode phases, and every row
    must still equal the one-device result, and the state's step the longest
    row's (the devices' maximum). Shared-prefix rollouts too. (The SPMD layout,
    which a 'tensor' mesh uses, is checked by the (2, 2, 2) tests.)
    """
    mesh = shd.make_mesh((2, 4, 1))
    sharded = M.shard_params(TINY, params, mesh)
    prompts = PROMPTS * 2
    free = S.generate(TINY, params, prompts, 24)
    eos = free[0][2]  # row 0, on device 0, stops first
    ends = [row.index(eos) if eos in row else 24 for row in free]
    assert ends[0] == 2 and max(ends) > 8  # device 0 stops in the first phase, another decodes past it
    toks, lens = S.pad_prompts(prompts, TINY.vocab_size, rows=8, length=16)
    each, one = S.Sampler(TINY, mesh=mesh), S.Sampler(TINY)
    assert each.independent_rows and not one.independent_rows
    assert not S.Sampler(TINY, mesh=mesh, independent_rows=False).independent_rows
    kw = dict(max_new=24, strategy=S.SamplingStrategy(), stop=S.StopCondition(eos_id=eos), seed=6)
    ref, st = one.sample(params, toks, lens, **kw), each.sample(sharded, toks, lens, **kw)
    assert [len(r) for r in S.unpad(ref, 8)] == [min(e + 1, 24) for e in ends]
    assert S.unpad(st, 8) == S.unpad(ref, 8)
    np.testing.assert_array_equal(np.asarray(st.num_generated), np.asarray(ref.num_generated))
    np.testing.assert_allclose(np.asarray(st.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    # One step counter per device's loop: its longest row's count, 24 on the devices that ran to the limit.
    assert st.step.shape == (8,) and ref.step.shape == (1,) and int(ref.step[0]) == 24
    np.testing.assert_array_equal(np.asarray(st.step), np.asarray(st.num_generated))
    roll = dict(k=2, **kw)
    assert S.unpad(each.rollouts(sharded, toks, lens, **roll), 16) == \
        S.unpad(one.rollouts(params, toks, lens, **roll), 16)
    assert st.tokens.sharding.spec == shd.logical_to_spec(("activation_batch", None))
    # the weights are whole on every device; the rules table splits them over fsdp for training
    assert all(s.is_fully_replicated for s in jax.tree_util.tree_leaves(each.param_shardings))
    with pytest.raises(ValueError, match="multiple of 8 prefixes, got 4"):
        each.rollouts(sharded, toks[:4], lens[:4], **roll)
    # The front door pads its prefixes to the device count: 8 rows of K=4 become 8 prefixes, not 2.
    gen = dict(max_new=8, rows=8, max_prompt_len=16)
    t1 = dict(k=4, strategy=S.SamplingStrategy(temperature=1.0), seed=3)
    assert [[c.tokens for c in r] for r in S.Generator(TINY, sharded, mesh=mesh, **gen).generate(PROMPTS, **t1)] == \
        [[c.tokens for c in r] for r in S.Generator(TINY, params, **gen).generate(PROMPTS, **t1)]
    with pytest.raises(ValueError, match="tensor=1"):
        S.Sampler(TINY, mesh=shd.make_mesh((2, 2, 2)), independent_rows=True)


def test_few_rows_per_device_decode_in_the_per_core_program_with_the_same_tokens(params, monkeypatch):
    """Data-parallel loops of up to DECODE_PER_CORE_MAX_ROWS rows a device run `hardware.decode_compiler_options`.

    Which program a call ran is read from the two jitted functions' caches; forcing the default
    program must give the same tokens and logprobs (the options change kernels, not the math).
    """
    from types import SimpleNamespace

    from glore_jax import hardware

    cpu, real_flags = SimpleNamespace(platform="cpu"), hardware.cpu_flags
    monkeypatch.setattr(hardware, "host_cores", lambda: 4)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert hardware.decode_compiler_options([cpu] * 4) == hardware.CPU_DECODE_PER_CORE_OPTIONS
    assert hardware.decode_compiler_options([cpu] * 2) is None  # a device's loop needs the pool's threads
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))  # and 512-bit vectors
    assert hardware.decode_compiler_options([cpu] * 4) == {**hardware.CPU_DECODE_PER_CORE_OPTIONS,
                                                           "xla_cpu_prefer_vector_width": 512}
    assert hardware.decode_compiler_options([SimpleNamespace(platform="gpu")] * 8) is None
    # bf16 loops keep YNNPACK's native bf16 kernels where the CPU has them; emulated bf16 and float32 do not.
    assert hardware.decode_compiler_options([cpu] * 4, "bfloat16") == hardware.decode_compiler_options([cpu] * 4)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert hardware.decode_compiler_options([cpu] * 4, "bfloat16") == {
        **hardware.CPU_DECODE_PER_CORE_NATIVE_BF16_OPTIONS, "xla_cpu_prefer_vector_width": 512}
    assert "xla_cpu_experimental_ynn_fusion_type" not in hardware.decode_compiler_options([cpu] * 4, "bfloat16")
    assert hardware.decode_compiler_options([cpu] * 4, "float32")["xla_cpu_experimental_ynn_fusion_type"] == ""
    monkeypatch.setattr(hardware, "cpu_flags", real_flags)
    asked = []  # the sampler asks for its own compute dtype's options
    real_options = hardware.decode_compiler_options
    monkeypatch.setattr(hardware, "decode_compiler_options", lambda d, dtype: asked.append(dtype) or real_options(d, dtype))
    S.Sampler(TINY.replace(dtype="bfloat16"), mesh=shd.make_mesh((8, 1, 1)))
    S.Sampler(TINY, mesh=shd.make_mesh((8, 1, 1)))
    assert asked == ["bfloat16", "float32"]
    monkeypatch.setattr(hardware, "decode_compiler_options", real_options)
    monkeypatch.setattr(hardware, "host_cores", lambda: 8)  # the tests' 8 devices, one per core
    mesh = shd.make_mesh((2, 4, 1))
    sampler, spmd = S.Sampler(TINY, mesh=mesh), S.Sampler(TINY, mesh=mesh, independent_rows=False)
    most = 8 * hardware.DECODE_PER_CORE_MAX_ROWS
    assert sampler.advance_program(most) is sampler._advance_few_rows is not sampler.advance
    assert sampler.advance_program(most + 8) is sampler.advance
    assert spmd.advance_program(8) is spmd.advance  # one SPMD loop: its devices synchronise every step
    toks, lens = S.pad_prompts(PROMPTS * 4, TINY.vocab_size, rows=16, length=16)
    kw = dict(max_new=12, strategy=S.SamplingStrategy(), stop=S.StopCondition())
    sharded = M.shard_params(TINY, params, mesh)
    per_core = sampler.sample(sharded, toks, lens, **kw)
    assert sampler._advance_few_rows._cache_size() >= 1 and sampler.advance._cache_size() == 0
    monkeypatch.setattr(sampler, "advance_program", lambda rows: sampler.advance)
    default = sampler.sample(sharded, toks, lens, **kw)
    assert sampler.advance._cache_size() >= 1
    np.testing.assert_array_equal(np.asarray(per_core.tokens), np.asarray(default.tokens))
    np.testing.assert_allclose(np.asarray(per_core.logprobs), np.asarray(default.logprobs), atol=1e-5)


def test_per_core_loops_of_more_rows_decode_in_groups_with_the_same_results(params, monkeypatch):
    """Calls of DECODE_PER_CORE_MAX_ROWS+1 .. DECODE_GROUP_MAX_ROWS rows a device decode in groups.

    Sampled (temperature 1) and greedy rows, plain calls and rollouts with and without a shared
    prefix must give the state one loop over all rows gives (the row streams follow row ids),
    with every row, its cache included, in its place.
    """
    from glore_jax import hardware

    monkeypatch.setattr(hardware, "host_cores", lambda: 8)
    monkeypatch.setattr(hardware, "DECODE_PER_CORE_MAX_ROWS", 1)
    monkeypatch.setattr(hardware, "DECODE_GROUP_MAX_ROWS", 4)
    mesh = shd.make_mesh((2, 4, 1))
    sampler = S.Sampler(TINY, mesh=mesh)
    assert [sampler.group_size(n) for n in (8, 16, 32, 40)] == [8, 8, 8, 40]
    assert [sampler.group_size(n, share=2) for n in (8, 16)] == [8, 16]  # 8 prefixes x 2 > 8 rows, < 8 a group
    assert S.Sampler(TINY, mesh=mesh, independent_rows=False).group_size(32) == 32
    toks, lens = S.pad_prompts(PROMPTS * 4, TINY.vocab_size, rows=16, length=16)
    sharded = M.shard_params(TINY, params, mesh)
    prefills = []
    prefill = sampler.prefill
    sampler.prefill = lambda *a: prefills.append(1) or prefill(*a)

    def calls():
        kw = dict(max_new=12, stop=S.StopCondition(eos_id=7), seed=3)
        sampled = S.SamplingStrategy(temperature=1.0)
        return (sampler.sample(sharded, toks, lens, strategy=sampled, **kw),
                sampler.sample(sharded, toks, lens, strategy=S.SamplingStrategy(), **kw),
                sampler.rollouts(sharded, toks[:8], lens[:8], k=2, strategy=sampled, **kw),
                sampler.rollouts(sharded, toks[:8], lens[:8], k=2, strategy=sampled, share_prefix=False, **kw))

    grouped = calls()
    assert len(prefills) == 2 + 2 + 1 + 2  # rollouts of 8 shared prefixes: one group of 8 prompts
    monkeypatch.setattr(sampler, "group_size", lambda prompts, share=1: prompts)
    whole = calls()
    assert len(prefills) == 7 + 4
    for a, b in zip(grouped, whole, strict=True):
        for name in ("tokens", "num_generated", "done", "step"):
            np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)
        # Groups run the per-core program's kernels, one loop the default's: float sums may differ in order.
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
        # A stopped row's position and later cache slots only count the steps its loop ran on.
        live = ~np.asarray(a.done)
        np.testing.assert_array_equal(np.asarray(a.position)[live], np.asarray(b.position)[live])
        for row, fed in enumerate(np.asarray(a.num_generated) - 1):
            np.testing.assert_allclose(np.asarray(a.suffix.k[0][row, ..., :fed]),
                                       np.asarray(b.suffix.k[0][row, ..., :fed]), atol=1e-5)
    assert S.unpad(grouped[2], 16) == S.unpad(grouped[3], 16)


def test_data_parallel_sampling_programs_have_no_collective(params, monkeypatch):
    """No program that a data-parallel call runs on its rows communicates between devices.

    XLA:CPU starts the programs whose inputs are ready in any order on each device: two calls in
    flight whose programs each held a collective could wait on each other forever (the `pmax` of
    a replicated step counter once did). Read from the compiled programs of a grouped call and of
    a call in one loop, which between them run every program (`_place` gathers the training
    layout by design, and `_decode_params` reads its result before any decode starts).
    """
    import re

    from glore_jax import hardware

    monkeypatch.setattr(hardware, "host_cores", lambda: 8)
    monkeypatch.setattr(hardware, "DECODE_PER_CORE_MAX_ROWS", 1)
    monkeypatch.setattr(hardware, "DECODE_GROUP_MAX_ROWS", 4)
    mesh = shd.make_mesh((2, 4, 1))
    sampler = S.Sampler(TINY, mesh=mesh)
    ran = {}

    def record(name):
        fn = getattr(sampler, name)

        def call(*args):  # shapes and shardings only: the loop donates its state
            ran[name] = (fn, jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array)
                else x, args))
            return fn(*args)
        monkeypatch.setattr(sampler, name, call)

    for name in ("prefill", "weights", "start", "grow", "advance", "_advance_few_rows", "_join"):
        record(name)
    sharded = M.shard_params(TINY, params, mesh)
    kw = dict(max_new=12, strategy=S.SamplingStrategy(temperature=1.0), stop=S.StopCondition(eos_id=7))
    for rows in (16, 40):  # 2 rows a device: groups of 1 in the per-core loop; 5: one default loop
        toks, lens = S.pad_prompts((PROMPTS * 10)[:rows], TINY.vocab_size, rows=rows, length=16)
        sampler.sample(sharded, toks, lens, **kw)
    assert set(ran) == {"prefill", "weights", "start", "grow", "advance", "_advance_few_rows", "_join"}
    collective = re.compile(r"all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|collective-broadcast")
    for name, (fn, args) in ran.items():
        assert not collective.findall(fn.lower(*args).compile().as_text()), name


def test_data_parallel_sampler_gathers_the_same_params_once_and_new_params_again(params):
    """The decode layout of a set of params is kept between calls (`Sampler._decode_params`).

    A stale copy would decode the old weights after a training step, silently: new params must
    give the tokens a fresh sampler gives. Dropping the caller's params must drop the copy.
    """
    import gc

    mesh = shd.make_mesh((2, 4, 1))
    toks, lens = S.pad_prompts(PROMPTS * 2, TINY.vocab_size, rows=8, length=16)
    kw = dict(max_new=12, strategy=S.SamplingStrategy(temperature=1.0), stop=S.StopCondition(), seed=2)
    sampler = S.Sampler(TINY, mesh=mesh)
    gathers = []
    place = sampler._place
    sampler._place = lambda p: gathers.append(1) or place(p)
    first = M.shard_params(TINY, params, mesh)
    a, b = sampler.sample(first, toks, lens, **kw), sampler.rollouts(first, toks, lens, k=2, **kw)
    assert len(gathers) == 1
    second = M.shard_params(TINY, jax.tree_util.tree_map(lambda x: x * 0.5, params), mesh)
    c = sampler.sample(second, toks, lens, **kw)
    assert len(gathers) == 2
    fresh = S.Sampler(TINY, mesh=mesh)
    assert S.unpad(a, 8) == S.unpad(fresh.sample(first, toks, lens, **kw), 8)
    assert S.unpad(b, 16) == S.unpad(fresh.rollouts(first, toks, lens, k=2, **kw), 16)
    assert S.unpad(c, 8) == S.unpad(fresh.sample(second, toks, lens, **kw), 8) != S.unpad(a, 8)
    assert sampler._decode_cache is not None
    del second, c
    gc.collect()
    assert sampler._decode_cache is None
    # The weak references of a replaced copy may outlive it (held here); when their params die
    # afterwards, their callback must leave the newer copy alone.
    third, fourth = (M.shard_params(TINY, jax.tree_util.tree_map(lambda x, f=f: x * f, params), mesh)
                     for f in (0.25, 2.0))
    sampler.sample(third, toks, lens, **kw)
    replaced = sampler._decode_cache[1]
    sampler.sample(fourth, toks, lens, **kw)
    del third
    gc.collect()
    assert len(replaced) and sampler._decode_cache is not None and len(gathers) == 4
    del fourth
    gc.collect()
    assert sampler._decode_cache is None


def test_data_parallel_decode_reads_one_host_copy_of_the_weights(params, monkeypatch):
    """On CPU devices, every replica of the decode params aliases one buffer (`shd.share_host_replicas`).

    The copy must hold the same values, outlive the arrays it was made from, leave sharded
    arrays alone, and decode the tokens and logprobs that per-device copies decode.
    """
    import gc

    mesh = shd.make_mesh((2, 4, 1))
    sampler = S.Sampler(TINY, mesh=mesh)
    sharded = M.shard_params(TINY, params, mesh)
    placed, weights = sampler._decode_params(sharded)
    leaves = jax.tree_util.tree_leaves((placed, weights))
    assert len(leaves) > 10
    for leaf in leaves:
        assert len(leaf.addressable_shards) == 8
        assert len({s.data.unsafe_buffer_pointer() for s in leaf.addressable_shards}) == 1
    copies = jax.tree_util.tree_leaves(sampler.weights(sampler._place(sharded)))
    for got, want in zip(jax.tree_util.tree_leaves(weights), copies, strict=True):
        np.testing.assert_array_equal(np.asarray(got.addressable_shards[7].data), np.asarray(want))

    x = jax.device_put(np.arange(24, dtype=np.float32).reshape(4, 6), shd.replicated(mesh))
    shared = shd.share_host_replicas({"w": x, "split": sharded["lm_head"]["kernel"]})
    assert shared["split"] is sharded["lm_head"]["kernel"]
    del x
    gc.collect()
    last = shared["w"].addressable_shards[7].data
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a * 2)(last)), 2 * np.arange(24).reshape(4, 6))

    toks, lens = S.pad_prompts(PROMPTS * 2, TINY.vocab_size, rows=8, length=16)
    kw = dict(max_new=12, strategy=S.SamplingStrategy(), stop=S.StopCondition())
    one_copy = sampler.sample(sharded, toks, lens, **kw)
    monkeypatch.setattr(shd, "share_host_replicas", lambda tree: tree)
    copies = S.Sampler(TINY, mesh=mesh).sample(sharded, toks, lens, **kw)
    np.testing.assert_array_equal(np.asarray(one_copy.tokens), np.asarray(copies.tokens))
    np.testing.assert_array_equal(np.asarray(one_copy.logprobs), np.asarray(copies.logprobs))


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.06, 0.04]] * 4000))
    keys = jax.random.split(jax.random.key(0), 4000)
    cases = {S.SamplingStrategy(temperature=1.0, top_k=2): {0, 1},
             S.SamplingStrategy(temperature=1.0, top_p=0.7): {0, 1},     # 0.5 < 0.7 <= 0.75
             S.SamplingStrategy(temperature=1.0, top_p=0.8): {0, 1, 2},
             S.SamplingStrategy(temperature=2.0, top_k=3, top_p=0.99): {0, 1, 2}}
    for strategy, allowed in cases.items():
        tokens, _ = S.select(logits, keys, strategy)
        seen = set(np.asarray(tokens).tolist())
        assert seen == allowed, (strategy, seen)
    # renormalised frequencies within the kept set: 0.5 / 0.75 for token 0 under top_k=2
    tokens, _ = S.select(logits, keys, S.SamplingStrategy(temperature=1.0, top_k=2))
    assert abs(np.mean(np.asarray(tokens) == 0) - 2 / 3) < 0.03


def test_greedy_choice_is_the_first_maximal_index():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, (64, 50)).astype(np.float32)  # many tied maxima per row
    logits[5] = 1.0  # all tied: index 0
    logits[6, -1] = 9.0  # maximum last
    np.testing.assert_array_equal(np.asarray(S.first_argmax(jnp.asarray(logits))), logits.argmax(-1))
    tokens, logprobs = S.select(jnp.asarray(logits), None, S.SamplingStrategy())
    expected = jax.nn.log_softmax(jnp.asarray(logits), -1)[np.arange(64), logits.argmax(-1)]
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(expected), atol=1e-6)
    assert tokens.dtype == jnp.int32


def test_temperature_sampling_is_reproducible_per_seed(params):
    a = S.generate(TINY, params, PROMPTS, 10, temperature=1.0, seed=7)
    b = S.generate(TINY, params, PROMPTS, 10, temperature=1.0, seed=7)
    c = S.generate(TINY, params, PROMPTS, 10, temperature=1.0, seed=8)
    assert a == b and a != c


def test_eos_stops_each_row_independently(params):
    free = S.generate(TINY, params, PROMPTS, 12)
    eos = free[0][4]
    first = [row.index(eos) if eos in row else None for row in free]
    out = S.generate(TINY, params, PROMPTS, 12, eos_id=eos)
    for row, f, stop_at in zip(out, free, first):
        if stop_at is None:
            assert row == f
        else:
            assert row == f[:stop_at + 1] and row[-1] == eos
    assert len(out[0]) == first[0] + 1 < 12 and any(len(r) == 12 for r in out)


@pytest.mark.parametrize("window", [None, 3])
def test_prefill_keeps_the_forwards_keys_and_last_logits_and_skips_the_last_layers_other_tokens(params, window):
    cfg = TINY.replace(sliding_window=window)
    toks, lens = S.pad_prompts(PROMPTS, cfg.vocab_size, rows=4, length=16)  # ragged, one of length 1
    prefill = jax.jit(decoding.prefill, static_argnums=0)
    cache, logits = prefill(cfg, params, toks, lens)
    idx = np.arange(toks.shape[1])[None, :]
    positions = np.where(idx < lens[:, None], idx, -1)
    full = jax.jit(lambda p, t, q: M.apply(cfg, p, t, q, want_values=False, return_kv=True))(params, toks, positions)
    ref = decoding.LayerCache.from_stacked(full.cache)
    for got, want in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_array_equal(got, want)  # bit for bit: the decode reads these keys
    np.testing.assert_allclose(logits, full.logits[np.arange(4), lens - 1], rtol=1e-5, atol=1e-5)
    # The last layer's attention output and MLP run at one token a row, not all 16: the compiled
    # program does less than the full backbone alone (no LM head) by most of that layer's work.
    flops = lambda f, *a: f.lower(*a).compile().cost_analysis()["flops"]  # noqa: E731
    backbone = jax.jit(lambda p, t, q: M.apply(cfg, p, t, q, want_logits=False, want_values=False).hidden)
    e, f, t = cfg.embed_dim, cfg.mlp_dim, toks.shape[1]
    skipped = 4 * (t - 1) * 2 * (3 * e * f + cfg.num_heads * cfg.head_dim * e)  # MLP and output projection
    lm_head = 4 * 2 * e * cfg.vocab_size
    assert flops(prefill, cfg, params, toks, lens) < flops(backbone, params, toks, positions) - 0.8 * skipped + lm_head


def test_logprobs_are_the_models(params):
    sampler = S.sampler_for(TINY)
    toks, lens = S.pad_prompts(PROMPTS, TINY.vocab_size, rows=4, length=16)
    st = sampler.sample(params, toks, lens, max_new=4, strategy=S.SamplingStrategy(temperature=1.0),
                        stop=S.StopCondition(), seed=1)
    seq = PROMPTS[0] + np.asarray(st.tokens[0]).tolist()
    ref = jax.nn.log_softmax(M.policy_logits(TINY, params, jnp.array([seq]))[0], -1)
    want = [ref[len(PROMPTS[0]) - 1 + i, seq[len(PROMPTS[0]) + i]] for i in range(4)]
    np.testing.assert_allclose(np.asarray(st.logprobs[0]), want, atol=1e-4)


def test_prefix_shared_rollouts_equal_unshared(params):
    sampler = S.sampler_for(TINY)
    toks, lens = S.pad_prompts(PROMPTS, TINY.vocab_size, rows=4, length=16)
    kw = dict(k=8, max_new=12, strategy=S.SamplingStrategy(temperature=1.0, top_p=0.95),
              stop=S.StopCondition(eos_id=7), seed=3)
    shared = sampler.rollouts(params, toks, lens, share_prefix=True, **kw)
    naive = sampler.rollouts(params, toks, lens, share_prefix=False, **kw)
    assert S.unpad(shared, 32) == S.unpad(naive, 32)
    rows = S.unpad(shared, 32)
    assert len({tuple(r) for r in rows[:8]}) > 1  # K rollouts of one prefix differ


def test_decode_phases_and_weight_layout_do_not_change_tokens(params):
    """The suffix cache's growth schedule and where layer weights are sliced are speed choices only."""
    toks, lens = S.pad_prompts(PROMPTS, TINY.vocab_size, rows=4, length=16)
    kw = dict(max_new=24, strategy=S.SamplingStrategy(temperature=1.0, top_k=20), stop=S.StopCondition(), seed=9)
    runs = [S.Sampler(TINY, decode_phases=n, split_weights=split).sample(params, toks, lens, **kw)
            for n, split in ((1, True), (8, True), (3, False))]
    assert S.phase_widths(24, 8) == [8, 16, 23] and S.phase_widths(24, 1) == [23] and S.phase_widths(1, 8) == []
    for other in runs[1:]:
        assert S.unpad(other, 4) == S.unpad(runs[0], 4)
        np.testing.assert_allclose(np.asarray(other.logprobs), np.asarray(runs[0].logprobs), atol=1e-5)
    assert runs[1].suffix.length == 23


class CompileCounter:
    """Counts jit cache misses: each ends in an XLA backend compilation or, when the persistent
    compilation cache (tests/conftest.py) has the executable already, a load from it."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def _on_event(self, event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            self.count += 1


def test_no_recompilation_for_same_buckets(params):
    counter = CompileCounter()
    S.generate(TINY, params, [[1, 2, 3]] * 3, 9)
    before = counter.count
    S.generate(TINY, params, [[4, 5], [6, 7, 8, 9], [1], [2]], 12, seed=1)   # same buckets: 4 rows, 16, 16
    S.generate(TINY, params, [[1] * 15, [2], [3]], 16, seed=2, temperature=0.0)
    assert counter.count == before
    S.generate(TINY, params, [[1] * 40], 16)                           # a new prompt bucket compiles
    assert counter.count > before


def test_bad_prompts_raise():
    with pytest.raises(ValueError, match="at least one prompt"):
        S.pad_prompts([], 10, rows=1, length=4)
    with pytest.raises(ValueError, match="outside"):
        S.pad_prompts([[1, 300]], 256, rows=1, length=4)
    with pytest.raises(ValueError, match="empty"):
        S.pad_prompts([[]], 256, rows=1, length=4)


def test_stop_string_newline_ends_a_step(shared_dir, params):
    from glore_jax.tokenizer import Tokenizer
    tok = Tokenizer.load(shared_dir / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model")
    ids = S.stop_ids_for_strings(tok, ["\n"])
    assert tok.encode("a\nb")[1] in ids and tok.encode("hello")[0] not in ids
    # map the tiny model's ids onto a pretend newline set: stop at the first such id
    free = S.generate(TINY, params, PROMPTS, 12)
    newline_like = (free[1][2],)
    out = S.generate(TINY, params, PROMPTS, 12, stop_ids=newline_like)
    assert out[1] == free[1][:free[1].index(newline_like[0]) + 1]


def test_vocab_limit_is_never_exceeded(params):
    sampler = S.Sampler(TINY, vocab_limit=100)
    toks, lens = S.pad_prompts(PROMPTS, TINY.vocab_size, rows=4, length=16)
    for temperature in (0.0, 2.0):
        st = sampler.sample(params, toks, lens, max_new=16, strategy=S.SamplingStrategy(temperature=temperature),
                            stop=S.StopCondition(), seed=5)
        assert np.asarray(st.tokens).max() < 100
    free = S.generate(TINY, params, PROMPTS, 16, temperature=2.0, seed=5)
    assert max(max(r) for r in free) >= 100  # without the limit, such ids do come up


def test_generator_fixed_shape_chunks_match_one_call_and_report_how_rows_ended(params):
    """Chunking, truncation counting and the stopped flag of the one generation front door."""
    eos = S.generate(TINY, params, PROMPTS, 12)[0][4]
    one_call = S.generate(TINY, params, PROMPTS, 12, eos_id=eos)
    gen = S.Generator(TINY, params, max_new=12, rows=2, max_prompt_len=16)
    out = gen.generate(PROMPTS, stop=S.StopCondition(eos_id=eos))
    assert [row[0].tokens for row in out] == one_call   # greedy: chunks of 2 rows change nothing
    for row in out:
        c = row[0]
        assert c.stopped == (c.tokens[-1] == eos) and len(c.logprobs) == len(c.tokens)
        assert c.stopped or len(c.tokens) == 12
    assert gen.truncated == 0
    short = S.Generator(TINY, params, max_new=4, rows=4, max_prompt_len=8)
    short.generate(PROMPTS)
    assert short.truncated == 1                         # the 11-token prompt was cut to 8
    # K samples per prompt, on an 8-device mesh, equal the same request on one device.
    mesh = shd.make_mesh((2, 2, 2))
    strategy = S.SamplingStrategy(temperature=1.0)
    a = S.Generator(TINY, params, max_new=8, rows=8, max_prompt_len=16).generate(PROMPTS, k=3, strategy=strategy,
                                                                                 seed=2)
    b = S.Generator(TINY, M.shard_params(TINY, params, mesh), max_new=8, rows=8, max_prompt_len=16,
                    mesh=mesh).generate(PROMPTS, k=3, strategy=strategy, seed=2)
    assert [[c.tokens for c in r] for r in a] == [[c.tokens for c in r] for r in b]
    assert all(len(r) == 3 for r in a) and len({tuple(c.tokens) for c in a[0]}) > 1
