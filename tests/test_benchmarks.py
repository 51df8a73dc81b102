"""The benchmarks' own arithmetic: the FLOP count the sampler benchmark's bound rests on."""

import jax
import numpy as np

from benchmarks.sampling import weight_matmul_flops
from glore_jax import models as M


def test_weight_matmul_flops_counts_every_weight_matrix_but_the_embedding_once_per_token():
    cfg = M.preset("tiny")
    params = M.init_params(cfg, jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    # Stacked layers are [L, ...]: a matrix there has 3+ dims; outside, 2. Norm scales are [L, E] or [E].
    matrices = sum(int(np.prod(a.shape)) for path, a in leaves
                   if "embedding" not in jax.tree_util.keystr(path) and "scale" not in jax.tree_util.keystr(path)
                   and a.ndim >= 2)
    batch, prompt, new = 3, 5, 4
    assert weight_matmul_flops(cfg, batch, prompt, new) == 2 * matrices * batch * (prompt + new - 1)
