"""glore_jax: GLoRe (Havrilla et al., 2024) in JAX: when, where and how to refine LLM reasoning."""

__version__ = "0.1.0"
