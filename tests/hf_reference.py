"""A random tiny transformers Llama saved with `save_pretrained`: the parity reference."""

from __future__ import annotations

import pathlib


def make_tiny_hf_llama(out_dir: pathlib.Path, *, tie: bool = False, seed: int = 0, vocab: int = 256):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_theta=500.0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Random init uses std 0.02, which makes logits nearly flat; widen them so
    # parity is tested on logits that actually vary.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0 if p.ndim > 1 else 1.0)
    model.save_pretrained(out_dir)
    return model
