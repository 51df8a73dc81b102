"""Creating, shaping and sharding params; deriving a value model from a policy.

Params are plain (unboxed) pytrees of float32 arrays. Their logical axis names
live in the boxed tree from `abstract_params`, which costs no memory, so
shardings for a 13B model can be computed and checked on a laptop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from glore_jax import sharding as shd
from glore_jax.models.config import ModelConfig
from glore_jax.models.transformer import LanguageModel

Params = dict[str, Any]


def _init_boxed(config: ModelConfig, rng: jax.Array) -> Params:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return LanguageModel(config).init(rng, tokens)["params"]


def abstract_params(config: ModelConfig) -> Params:
    """Boxed `nn.Partitioned` tree of ShapeDtypeStructs: shapes and logical axes, no memory."""
    return jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))


def logical_axes(config: ModelConfig) -> Params:
    """The logical axis names of every param, e.g. ('layers', 'embed', 'heads', 'head_dim')."""
    return nn.get_partition_spec(abstract_params(config))


def param_shardings(config: ModelConfig, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = shd.LOGICAL_RULES) -> Params:
    """NamedSharding per param, from the rules table; raises if the mesh cannot split a param."""
    boxed = abstract_params(config)
    shardings = shd.param_shardings(boxed, mesh, rules)
    shd.check_divisible(nn.unbox(boxed), shardings)
    return shardings


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def init_params(config: ModelConfig, rng: jax.Array, mesh: Mesh | None = None,
                rules: Sequence[tuple[str, Any]] = shd.LOGICAL_RULES) -> Params:
    """Random float32 params. With a mesh, each shard is created in place on its device."""
    if mesh is None:
        return nn.unbox(jax.jit(_init_boxed, static_argnums=0)(config, rng))
    out = param_shardings(config, mesh, rules)
    fn = jax.jit(lambda key: nn.unbox(_init_boxed(config, key)), out_shardings=out)
    return fn(rng)


def shard_params(config: ModelConfig, params: Params, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = shd.LOGICAL_RULES) -> Params:
    """Places an existing params tree on the mesh according to the rules table."""
    return jax.device_put(params, param_shardings(config, mesh, rules))


def _init_value_head(config: ModelConfig, rng: jax.Array) -> Params:
    # The head alone is tiny; init a value-only model abstractly and
    # materialise just its head.
    value_cfg = config.replace(heads=("value",), num_layers=1)
    return nn.unbox(jax.jit(_init_boxed, static_argnums=0)(value_cfg, rng))["value_head"]


def value_model_from_policy(config: ModelConfig, params: Params, rng: jax.Array, *,
                            share_backbone: bool = False) -> tuple[ModelConfig, Params]:
    """One call from a policy to a value model (ORM/SORM) with a fresh value head.

    share_backbone=False: a value-only model with its own copy of the backbone
      (what GLoRe trains: the ORM/SORM are fine-tuned separately from the policy).
    share_backbone=True: one params tree holding the policy's LM head *and* the
      value head over the same backbone arrays.
    """
    if "lm" not in config.heads:
        raise ValueError(f"Expected a policy config with an 'lm' head, got heads={config.heads}")
    head = _init_value_head(config, rng)
    if share_backbone:
        return config.replace(heads=("lm", "value")), {**params, "value_head": head}
    backbone = jax.tree_util.tree_map(jnp.copy, params["backbone"])
    return config.replace(heads=("value",)), {"backbone": backbone, "value_head": head}


def check_params(config: ModelConfig, params: Params) -> None:
    """Raises naming the first param whose path or shape differs from what `config` expects."""
    expected = nn.unbox(abstract_params(config))
    exp = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in sorted(exp.keys() - got.keys()):
        raise ValueError(f"Missing param {name} (expected shape {exp[name]})")
    for name in sorted(got.keys() - exp.keys()):
        raise ValueError(f"Unexpected param {name} for heads={config.heads}")
    for name, shape in exp.items():
        if tuple(got[name]) != tuple(shape):
            raise ValueError(f"Param {name} has shape {tuple(got[name])}, expected {tuple(shape)}")
