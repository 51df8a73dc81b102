"""The pipeline's compile cache: one program compiled once per run, the same results, settings restored after."""

import jax
import jax.numpy as jnp
import numpy as np

from glore_jax import compile_cache


def _fresh_jit():
    # A new Python function each time: JAX's in-memory cache cannot connect the two, only the
    # persistent one (keyed on the lowered program) can, as between two stages of the recipe.
    def f(x):
        for _ in range(4):
            x = jnp.tanh(x @ x.T + 1.0)
        return x.sum(0)
    return jax.jit(f)


def test_a_program_compiled_once_is_loaded_by_a_new_function_and_settings_come_back(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    x = jnp.asarray(np.random.default_rng(0).normal(size=(48, 48)), jnp.float32)
    with compile_cache.persistent(str(tmp_path / "cache"), min_compile_seconds=0):
        first_clock = compile_cache.CompileClock()
        first = _fresh_jit()(x)
        spent = first_clock.read()
        second_clock = compile_cache.CompileClock()
        second = _fresh_jit()(x)
        reused = second_clock.read()
    assert spent["compile_seconds"] > 0 and spent["compile_cache_hits"] == 0
    assert reused["compile_cache_hits"] == 1  # JAX's own event
    assert any(p.name.startswith("jit_f-") for p in (tmp_path / "cache").iterdir())
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    assert jax.config.jax_compilation_cache_dir == before
    # Outside the block nothing is written there any more.
    entries = set((tmp_path / "cache").iterdir())
    jax.jit(lambda v: jnp.cos(v) * 3.0)(x).block_until_ready()
    assert set((tmp_path / "cache").iterdir()) == entries


def test_a_run_keeps_its_programs_in_its_workdir_unless_the_caller_has_a_cache(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compile_cache.workdir_cache(str(tmp_path)) == str(tmp_path / "xla_cache")
        assert compile_cache.workdir_cache(str(tmp_path), enabled=False) == ""
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "elsewhere"))
        assert compile_cache.workdir_cache(str(tmp_path)) == ""
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
