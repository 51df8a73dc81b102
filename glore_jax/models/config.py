"""Model configuration and presets for the shared Llama-family backbone."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import jax.numpy as jnp

from glore_jax.errors import ConfigError

Head = Literal["lm", "value"]
_HEADS = ("lm", "value")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of one model. Frozen and hashable, so it can be a static jit argument.

    `heads` says which output heads the params hold:
      ('lm',)          a policy or refiner;
      ('value',)       a value model (ORM/SORM) with its own backbone copy;
      ('lm', 'value')  policy and value head reading one shared backbone.
    Params are always float32; `dtype` is the compute dtype of matmuls and the KV cache.
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: int | None = None
    heads: tuple[Head, ...] = ("lm",)
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if isinstance(self.heads, list):
            object.__setattr__(self, "heads", tuple(self.heads))
        bad = [h for h in self.heads if h not in _HEADS]
        if bad or not self.heads or len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"heads must be a non-empty subset of {_HEADS}, got {self.heads}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **kwargs: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    def num_params(self) -> int:
        """Exact parameter count (matches `jax.eval_shape` of the params)."""
        e, l = self.embed_dim, self.num_layers
        attn = e * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * e * self.mlp_dim + 2 * e
        total = self.vocab_size * e + l * per_layer + e
        if "lm" in self.heads and not self.tie_embeddings:
            total += e * self.vocab_size
        if "value" in self.heads:
            total += e + 1
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Forward+backward training FLOPs per token, for MFU estimates: 6 x the parameters that multiply
        (every weight matrix, the LM head included) plus attention's 12 x layers x heads x head_dim x seq_len.

        The input embedding is a row gather, no FLOPs, so its matrix counts only where it is also the LM
        head (tied). Until 2026-12-04 every parameter counted: 1.12x the demo model's FLOPs at 176
        tokens, 1.24x a 2-layer model of LLaMA-2 7B widths, 1.02x LLaMA-2 7B. Norm scales stay in (~1e-3).
        """
        attn = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        multiplies = self.tie_embeddings and "lm" in self.heads
        lookup = 0 if multiplies else self.vocab_size * self.embed_dim
        return 6.0 * (self.num_params() - lookup) + attn

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown ModelConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


# Published shapes. LLaMA-2 uses untied embeddings and full multi-head attention
# at 7B/13B; Mistral-7B v0.1 adds GQA (8 kv heads) and a 4096-token sliding window.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, mlp_dim=128),
    # The demo config's model: ~1M params, so the whole recipe trains in minutes on 2 CPU cores.
    "mini": ModelConfig(vocab_size=1024, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        head_dim=32, mlp_dim=384),
    "demo": ModelConfig(vocab_size=1024, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=2,
                        head_dim=64, mlp_dim=768),
    "llama2_7b": ModelConfig(vocab_size=32_000, embed_dim=4096, num_layers=32, num_heads=32,
                             num_kv_heads=32, head_dim=128, mlp_dim=11_008),
    "llama2_13b": ModelConfig(vocab_size=32_000, embed_dim=5120, num_layers=40, num_heads=40,
                              num_kv_heads=40, head_dim=128, mlp_dim=13_824),
    "mistral_7b": ModelConfig(vocab_size=32_000, embed_dim=4096, num_layers=32, num_heads=32,
                              num_kv_heads=8, head_dim=128, mlp_dim=14_336, sliding_window=4096),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with field overrides (e.g. `preset('demo', vocab_size=600)`)."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
