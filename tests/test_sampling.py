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


def widened_tiny_params():
    """TINY's random init widened, so that greedy choices are not near-ties."""
    p = M.init_params(TINY, jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim > 1 else x, p)


@pytest.fixture(scope="module")
def params():
    return widened_tiny_params()


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
