"""A model on disk: `model_config.json` plus an Orbax checkpoint of its params.

This is the format `python -m glore_jax.convert` writes and `init_from` reads.
Restores go straight to the requested shardings, so a 13B model never has to
fit on one host device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from glore_jax import checksums, files, sharding as shd
from glore_jax.errors import CheckpointError, MissingPathError
from glore_jax.models.config import ModelConfig
from glore_jax.models.params import Params, abstract_params, check_params, param_shardings

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_model(out_dir: str, config: ModelConfig, params: Params) -> None:
    check_params(config, params)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        checksums.write_manifest(os.path.join(out_dir, PARAMS_DIR))
        # The config goes last: its presence marks a complete model directory.
        files.write_atomic(os.path.join(out_dir, CONFIG_FILE), config.to_json())


def load_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise MissingPathError(f"{path} not found: {model_dir} is not a complete saved model")
    with open(path) as f:
        return ModelConfig.from_json(f.read())


def load_model(model_dir: str, mesh: Mesh | None = None,
               rules: Sequence[tuple[str, Any]] = shd.LOGICAL_RULES) -> tuple[ModelConfig, Params]:
    """(config, params); with a mesh, each param is restored directly into its sharding."""
    config = load_config(model_dir)
    abstract = nn.unbox(abstract_params(config))
    if mesh is None:
        mesh = shd.single_device_mesh()
    shardings = param_shardings(config, mesh, rules)
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    params_dir = os.path.join(os.path.abspath(model_dir), PARAMS_DIR)
    if checksums.has_manifest(params_dir) and (why := checksums.verify(params_dir)) is not None:
        raise CheckpointError(f"saved model {model_dir} is corrupt: {why}; retrain it (delete the directory) "
                              "or restore an intact copy")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir, target)
    return config, params
