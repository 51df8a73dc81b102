"""The shared Llama-family backbone with LM (policy/refiner) and value (ORM/SORM) heads."""

from glore_jax.models.config import PRESETS, ModelConfig, preset
from glore_jax.models.forward import apply, make_forward, next_token_nll, policy_logits, positions_from_mask
from glore_jax.models.params import (abstract_params, check_params, count_params, init_params, logical_axes,
                                     param_shardings, shard_params, value_model_from_policy)
from glore_jax.models.transformer import KVCache, LanguageModel, ModelOutput

__all__ = [
    "PRESETS", "ModelConfig", "preset", "apply", "make_forward", "next_token_nll", "policy_logits", "positions_from_mask",
    "abstract_params", "check_params", "count_params", "init_params", "logical_axes",
    "param_shardings", "shard_params", "value_model_from_policy", "KVCache", "LanguageModel", "ModelOutput",
]
