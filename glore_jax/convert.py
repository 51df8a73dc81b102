"""Import Hugging Face Llama / Mistral checkpoints.

`from_hf(hf_dir)` reads `config.json` and the safetensors weights (one file or
sharded with an index) with the safetensors library only: no torch needed.
`python -m glore_jax.convert --hf_dir DIR --out_dir DIR` writes the result as
a saved model (Orbax params + model_config.json) that training can start from.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import app, flags

from glore_jax import files
from glore_jax.errors import ConfigError, DataError, MissingPathError
from glore_jax.models.checkpoints import save_model
from glore_jax.models.config import ModelConfig
from glore_jax.models.params import check_params, count_params

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    archs = hf_config.get("architectures") or [hf_config.get("model_type", "<unknown>")]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"Unsupported architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
    unsupported = {
        "hidden_act": (hf_config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf_config.get("attention_bias", False), False),
        "mlp_bias": (hf_config.get("mlp_bias", False), False),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ConfigError(f"Unsupported {arch} setting {key}={got!r} (only {want!r} is implemented)")
    # transformers >= 5 moves rope settings into `rope_parameters`.
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"Unsupported rope scaling type {rope_type!r}; only unscaled RoPE is implemented")
    theta = rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))
    heads = hf_config["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf_config["vocab_size"],
        embed_dim=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        mlp_dim=hf_config["intermediate_size"],
        rope_theta=float(theta),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        sliding_window=hf_config.get("sliding_window") if arch == "MistralForCausalLM" else None,
    )


class _SafetensorsReader:
    """Tensors by name across one or many safetensors files, read lazily as float32 numpy."""

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {name: os.path.join(hf_dir, fn) for name, fn in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open
            with safe_open(single, framework="numpy") as f:
                self._files = {name: single for name in f.keys()}
        else:
            raise MissingPathError(f"No model.safetensors or model.safetensors.index.json in {hf_dir}")
        self.hf_dir = hf_dir

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> np.ndarray:
        if name not in self._files:
            raise DataError(f"Missing tensor {name!r} in the checkpoint at {self.hf_dir}")
        from safetensors import safe_open
        # The "flax" framework handles bfloat16, which plain numpy cannot.
        with safe_open(self._files[name], framework="flax") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)


def from_hf(hf_dir: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, float32 params) from a Hugging Face Llama or Mistral directory."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise MissingPathError(f"{config_path} not found")
    with open(config_path) as f:
        cfg = config_from_hf(json.load(f))
    r = _SafetensorsReader(hf_dir)
    e, h, kvh, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def stack(fn):
        return np.stack([fn(f"model.layers.{i}.") for i in range(cfg.num_layers)])

    # HF stores Linear weights as [out, in]; ours are [in, ...out] (and o is [H, D, E]).
    layers = {
        "attn": {
            "q": stack(lambda p: r.get(p + "self_attn.q_proj.weight").T.reshape(e, h, d)),
            "k": stack(lambda p: r.get(p + "self_attn.k_proj.weight").T.reshape(e, kvh, d)),
            "v": stack(lambda p: r.get(p + "self_attn.v_proj.weight").T.reshape(e, kvh, d)),
            "o": stack(lambda p: r.get(p + "self_attn.o_proj.weight").T.reshape(h, d, e)),
        },
        "mlp": {
            "gate": stack(lambda p: r.get(p + "mlp.gate_proj.weight").T),
            "up": stack(lambda p: r.get(p + "mlp.up_proj.weight").T),
            "down": stack(lambda p: r.get(p + "mlp.down_proj.weight").T),
        },
        "attn_norm": {"scale": stack(lambda p: r.get(p + "input_layernorm.weight"))},
        "mlp_norm": {"scale": stack(lambda p: r.get(p + "post_attention_layernorm.weight"))},
    }
    params: dict[str, Any] = {
        "backbone": {
            "embedding": r.get("model.embed_tokens.weight"),
            "layers": layers,
            "final_norm": {"scale": r.get("model.norm.weight")},
        }
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": r.get("lm_head.weight").T}
    check_params(cfg, params)
    return cfg, params


def to_hf(config: ModelConfig, params: dict[str, Any], out_dir: str) -> None:
    """Writes a Hugging Face `LlamaForCausalLM` directory (config.json + model.safetensors).

    The inverse of `from_hf`, for exporting trained policies and for parity
    checks and benchmarks against `transformers`.
    """
    from safetensors.numpy import save_file
    if "lm" not in config.heads:
        raise ValueError(f"Only models with an 'lm' head export to LlamaForCausalLM; heads={config.heads}")
    check_params(config, params)
    c, bb = config, params["backbone"]
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    tensors = {"model.embed_tokens.weight": f32(bb["embedding"]), "model.norm.weight": f32(bb["final_norm"]["scale"])}
    lay = bb["layers"]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = f32(lay["attn"]["q"][i].reshape(c.embed_dim, -1).T)
        tensors[p + "self_attn.k_proj.weight"] = f32(lay["attn"]["k"][i].reshape(c.embed_dim, -1).T)
        tensors[p + "self_attn.v_proj.weight"] = f32(lay["attn"]["v"][i].reshape(c.embed_dim, -1).T)
        tensors[p + "self_attn.o_proj.weight"] = f32(lay["attn"]["o"][i].reshape(-1, c.embed_dim).T)
        for name in ("gate", "up", "down"):
            tensors[p + f"mlp.{name}_proj.weight"] = f32(lay["mlp"][name][i].T)
        tensors[p + "input_layernorm.weight"] = f32(lay["attn_norm"]["scale"][i])
        tensors[p + "post_attention_layernorm.weight"] = f32(lay["mlp_norm"]["scale"][i])
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = f32(params["lm_head"]["kernel"].T)
    hf_config = {
        "architectures": ["MistralForCausalLM" if c.sliding_window else "LlamaForCausalLM"],
        "model_type": "mistral" if c.sliding_window else "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.embed_dim, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings,
        "max_position_embeddings": 4096, "torch_dtype": "float32",
        **({"sliding_window": c.sliding_window} if c.sliding_window else {}),
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    files.write_json(os.path.join(out_dir, "config.json"), hf_config, indent=2)


_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json + safetensors).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the saved model.")


def main(argv):
    del argv
    config, params = from_hf(_HF_DIR.value)
    save_model(_OUT_DIR.value, config, params)
    print(f"Wrote {count_params(params) / 1e6:.1f}M params ({config.num_layers} layers) to {_OUT_DIR.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["hf_dir", "out_dir"])
    app.run(main)
