"""The benchmarks' own arithmetic (the FLOP count the sampler benchmark's bound rests on) and what they record of the CPU."""

import jax
import numpy as np

from benchmarks.sampling import paired_speedup, weight_matmul_flops
from glore_jax import models as M


def test_weight_matmul_flops_counts_what_a_sampler_cannot_skip():
    cfg = M.preset("tiny")
    params = M.init_params(cfg, jax.random.key(0))
    layers = params["backbone"]["layers"]
    size = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))  # noqa: E731
    # Stacked [L, ...] weights, by name: one layer's matrices, and the last layer's k and v.
    attn, mlp = layers["attn"], layers["mlp"]
    n = cfg.num_layers
    layer = (size(attn) + size(mlp)) // n
    kv = (size(attn["k"]) + size(attn["v"])) // n
    lm_head = size(params["lm_head"])
    batch, prompt, new = 3, 5, 4
    per_row = (prompt * ((n - 1) * layer + kv)      # every prompt token: every layer but the last, the last's k, v
               + (layer - kv) + lm_head             # the last prompt token: the rest of the last layer, the logits
               + (new - 1) * (n * layer + lm_head))  # each fed token: everything
    assert weight_matmul_flops(cfg, batch, prompt, new) == 2 * batch * per_row
    # Against counting every matrix at every token: less by the last layer's other prompt tokens and their logits.
    everything = 2 * batch * (prompt + new - 1) * (n * layer + lm_head)
    assert everything - weight_matmul_flops(cfg, batch, prompt, new) == 2 * batch * (prompt - 1) * (layer - kv + lm_head)


def test_paired_speedup_is_the_geometric_mean_of_the_pairs_with_a_t_interval_on_their_logs():
    same = paired_speedup([3.0, 3.0, 3.0])
    assert same["runs"] == 3 and np.isclose(same["geomean"], 3.0) and np.allclose(same["ci95"], [3.0, 3.0])
    two = paired_speedup([2.0, 4.5])  # logs ln 2 and ln 4.5: mean ln 3, sd |ln 2.25| / sqrt 2, t(1) = 12.706
    half = 12.706 * abs(np.log(2.25)) / np.sqrt(2) / np.sqrt(2)
    assert np.isclose(two["geomean"], 3.0)
    np.testing.assert_allclose(two["ci95"], [3.0 * np.exp(-half), 3.0 * np.exp(half)], rtol=1e-3)


def test_cpu_info_tells_cpu_generations_of_one_name_apart(monkeypatch):
    # Two clouds' "AMD EPYC" differ 2x in matmul rate (Zen 4, family 25; Zen 5, family 26): a benchmark
    # that records the name alone cannot say which machine its figures came from.
    import subprocess

    from benchmarks import common

    lscpu = ("Architecture:  x86_64\nModel name:    AMD EPYC\nCPU family:    26\nModel:         2\n"
             "Flags:         fpu avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=lscpu))
    info = common.cpu_info()
    assert (info["cpu"], info["cpu_family"], info["cpu_model_id"]) == ("AMD EPYC", "26", "2")
    assert info["native_bf16"] and info["bf16_flags"] == ["avx512_bf16"] and info["avx2"] and info["avx512f"]


def test_the_torch_peer_runs_where_jax_runs_and_times_to_a_sync(monkeypatch):
    # A GPU figure against torch on the host CPU would say nothing; a CUDA call timed without a sync
    # times its launch only; and torch's float32 default (full precision) against XLA's on NVIDIA GPUs
    # (TF32) would compare different arithmetic.
    from benchmarks import common

    assert common.torch_device("gpu") == "cuda" and common.torch_device("cpu") == "cpu"
    # The accelerator's peak shape is large enough that a launch is noise beside it; the CPU's fits 2 cores.
    assert common.matmul_shape("cpu") == (1024, 4096, 1024) and min(common.matmul_shape("gpu")) >= 8192

    class FakeTorch:
        calls = []
        cuda = type("cuda", (), {"synchronize": staticmethod(lambda: FakeTorch.calls.append("sync"))})

        @staticmethod
        def set_float32_matmul_precision(p):
            FakeTorch.calls.append(("precision", p))

        @staticmethod
        def set_num_threads(n):
            FakeTorch.calls.append(("threads", n))

    sync = common.torch_setup(FakeTorch, "cuda")
    sync()
    assert FakeTorch.calls == [("precision", "high"), "sync"]
    FakeTorch.calls.clear()
    # On the CPU, torch gets the cores this process may use (its affinity), not the host's count.
    import os
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    common.torch_setup(FakeTorch, "cpu")()
    assert FakeTorch.calls == [("threads", 3)]


def test_step_profile_sorts_xla_cpu_kernels_into_kinds():
    # The profile's verdict ("the gap is elementwise work, not matmuls") rests on these names: a matmul
    # counted as a fusion, or a collective's waiting counted as work, would turn it around.
    from benchmarks.step_profile import kind_of

    custom = {"ynn_fusion.3"}
    assert kind_of("dot.28", custom) == kind_of("dot_general.171", custom) == "matmul"
    assert kind_of("ynn_fusion.3", custom, "jit(step)/lm_head/dot_general") == "library matmul"
    assert kind_of("ynn_fusion.3", custom, "jit(step)/layers/attn/reduce_sum") == "library reduction or other"
    assert kind_of("wrapped_reduce-window.17", custom) == "reduce-window"
    assert kind_of("subtract_exponential_fusion.4", custom) == "elementwise fusion"
    assert kind_of("all-reduce.61", custom) == kind_of("all-gather.1", custom) == "collective (incl. waiting)"
    assert kind_of("wrapped_multiply.14", custom) == "multiply"


def test_train_options_variant_replaces_the_projects_options_for_its_own_step_only():
    # A variant's options must reach the compiler (a bogus option fails there), and the swap must not leak
    # into the steps built after it, or every later "project" row would time the variant.
    import pytest

    from benchmarks import train, train_options
    from glore_jax import hardware

    original = hardware.train_compiler_options
    cfg = M.preset("tiny", vocab_size=256)
    with pytest.raises(Exception, match="xla_no_such_option"):
        train_options.build(cfg, {"xla_no_such_option": 1}, seq=16)
    assert hardware.train_compiler_options is original
    step, state, batch = train_options.build(cfg, None, seq=16)
    assert batch["tokens"].shape == (train.BATCH, 16)


def test_train_options_query_block_reaches_the_trace_and_does_not_leak(monkeypatch):
    from benchmarks import train_options
    from glore_jax.models import attention_core

    seen, edges = [], attention_core.query_block_edges
    monkeypatch.setattr(attention_core, "query_block_edges",
                        lambda t, block=None: seen.append(attention_core.QUERY_BLOCK) or edges(t, block))
    before = attention_core.QUERY_BLOCK
    train_options.build(M.preset("tiny", vocab_size=256), None, seq=16, query_block=5)
    assert seen and set(seen) == {5}
    assert attention_core.QUERY_BLOCK == before


def test_step_profile_assigns_forward_and_backward_kernels_to_their_part():
    from benchmarks.step_profile import part_of

    assert part_of("jit(step)/jvp(LanguageModel)/backbone/closed_call/layers/attn/exp") == part_of(
        "jit(step)/transpose(jvp(LanguageModel))/backbone/closed_call/layers/attn/nkms,nkmd->nksd/dot_general")
    assert part_of("jit(step)/jvp(LanguageModel)/backbone/closed_call/layers/attn_norm/mul") == "norms"
    assert part_of("jit(step)/transpose(jvp(LanguageModel))/backbone/closed_call/layers/mlp/transpose") == "MLP"
    assert part_of("jit(step)/transpose(jvp(LanguageModel))/lm_head/transpose") == "LM head"
    assert part_of("jit(step)/mul") == "optimizer, clipping and the rest"
