"""The data-parallel sampler: one decode loop a device, its per-core programs and groups, no collective,
the kept decode weights and their one host copy; each against one device's or the default program's tokens."""

import jax
import numpy as np
import pytest

from glore_jax import models as M
from glore_jax import sampling as S
from glore_jax import sharding as shd
from tests.test_sampling import PROMPTS, TINY, widened_tiny_params


@pytest.fixture(scope="module")
def params():
    return widened_tiny_params()


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
    prefill = sampler._prefill_split  # (a data-parallel sampler's prefill, on its kept split layers)
    sampler._prefill_split = lambda *a: prefills.append(1) or prefill(*a)

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

    names = ("_prefill_split", "_split_layers", "weights", "start", "grow", "advance", "_advance_few_rows", "_join")
    for name in names:
        record(name)
    sharded = M.shard_params(TINY, params, mesh)
    kw = dict(max_new=12, strategy=S.SamplingStrategy(temperature=1.0), stop=S.StopCondition(eos_id=7))
    for rows in (16, 40):  # 2 rows a device: groups of 1 in the per-core loop; 5: one default loop
        toks, lens = S.pad_prompts((PROMPTS * 10)[:rows], TINY.vocab_size, rows=rows, length=16)
        sampler.sample(sharded, toks, lens, **kw)
    assert set(ran) == set(names)
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
    assert sampler._kept.entry is not None
    del second, c
    gc.collect()
    assert sampler._kept.entry is None
    # The weak references of a replaced copy may outlive it (held here); when their params die
    # afterwards, their callback must leave the newer copy alone.
    third, fourth = (M.shard_params(TINY, jax.tree_util.tree_map(lambda x, f=f: x * f, params), mesh)
                     for f in (0.25, 2.0))
    sampler.sample(third, toks, lens, **kw)
    replaced = sampler._kept.entry[1]
    sampler.sample(fourth, toks, lens, **kw)
    del third
    gc.collect()
    assert len(replaced) and sampler._kept.entry is not None and len(gathers) == 4
    del fourth
    gc.collect()
    assert sampler._kept.entry is None


def test_data_parallel_decode_reads_one_host_copy_of_the_weights(params, monkeypatch):
    """On CPU devices, every replica of the decode params aliases one buffer (`shd.share_host_replicas`).

    The copy must hold the same values, outlive the arrays it was made from, leave sharded
    arrays alone, and decode the tokens and logprobs that per-device copies decode.
    """
    import gc

    mesh = shd.make_mesh((2, 4, 1))
    sampler = S.Sampler(TINY, mesh=mesh)
    sharded = M.shard_params(TINY, params, mesh)
    prefill, weights = sampler._decode_params(sharded)
    leaves = jax.tree_util.tree_leaves((prefill.args, weights))
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


def test_data_parallel_prefill_reads_the_kept_split_layers_and_slices_no_weight(params):
    """A data-parallel sampler's prefill reads the per-layer arrays it keeps (`Sampler._decode_params`).

    On XLA:CPU each slice of a stacked weight is a copy at every call (the demo preset's two group
    prefills of a batch-64 call took 29.9 against 27.6 ms): the kept layers' program must slice none,
    and give the stacked params' prefix cache and logits bit for bit.
    """
    import re

    mesh = shd.make_mesh((2, 4, 1))
    sampler = S.Sampler(TINY, mesh=mesh)
    sharded = M.shard_params(TINY, params, mesh)
    prefill, _ = sampler._decode_params(sharded)
    toks, lens = S.pad_prompts(PROMPTS * 2, TINY.vocab_size, rows=8, length=16)
    args = sampler.put_rows(toks), sampler.put_rows(lens)
    stacked = sampler._place(sharded)
    (cache, logits), (want_cache, want_logits) = prefill(*args), sampler.prefill(stacked, *args)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want_logits))
    for got, want in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(want_cache), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    def slices(fn, *a):
        return re.findall(r'op_name="[^"]*/slice"', fn.lower(*a).compile().as_text())
    assert slices(sampler.prefill, stacked, *args)  # the stacked params: each layer sliced at every call
    assert not slices(sampler._prefill_split, *prefill.args, *args)
