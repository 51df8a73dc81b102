"""tunix's sampler on our weights: the peer `benchmarks/sampling.py` compares decode speed with.

Needs the `bench` extra (`pip install -e '.[bench]'`: google-tunix), kept out of
the test extra because it pins its own transformers. The same random `demo`
weights go through our HF export (`convert.to_hf`) into tunix's Llama-3 model
(`tunix.models.llama3.params.create_model_from_safe_tensors`); prompts are the
same random ids as ours, fed through a tokenizer that reads ids written as
text, so neither side tokenizes anything. Greedy, no stop token, a KV cache
sized to prompt + new tokens, fastest of `repeats` runs after a warm-up, as
for our sampler, and timed alternately with ours run by run (the machine's
speed drifts within the hour; see `sampling.bench_decode_vs_hf`). Before timing, the greedy tokens of both samplers are
compared, which checks the weight mapping: a mismatch is reported, not hidden.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np


def available() -> bool:
    return importlib.util.find_spec("tunix") is not None


class _IdsTokenizer:
    """'17 4 99' <-> [17, 4, 99]; no BOS (bos_id 0 is falsy to tunix, so none is prepended)."""

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return 1

    def pad_id(self) -> int:
        return 0


def _model(hf_dir: str, cfg):
    from tunix.models.llama3 import model as llama, params
    config = llama.ModelConfig(num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim,
                               hidden_dim=cfg.mlp_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                               num_kv_heads=cfg.num_kv_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.norm_eps,
                               weight_tying=cfg.tie_embeddings)
    return params.create_model_from_safe_tensors(hf_dir, config)


def bench_decode(hf_dir: str, cfg, prompts: dict[int, np.ndarray], new: int, repeats: int,
                 ours_greedy: np.ndarray, ours: dict) -> dict:
    """{batch: tokens/s} for tunix's sampler and for `ours[batch]` (one call of our sampler on the same
    prompts), timed alternately, each pair's speedup (tunix's time over ours), and how many greedy
    tokens match ours on the first batch."""
    from tunix.generate import sampler as ts
    model = _model(hf_dir, cfg)
    prompt_len = next(iter(prompts.values())).shape[1]
    sampler = ts.Sampler(model, _IdsTokenizer(), ts.CacheConfig(cache_size=prompt_len + new + 8,
                                                                num_layers=cfg.num_layers,
                                                                num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    never = [cfg.vocab_size + 7]  # an id no logit row has: no row ever stops early

    def run(toks):
        out = sampler([" ".join(map(str, row)) for row in toks], max_generation_steps=new,
                      max_prompt_length=prompt_len, temperature=0.0, eos_tokens=never, pad_output=True)
        return np.asarray([np.asarray(t)[:new] for t in out.tokens])

    first = next(iter(prompts))
    theirs = run(prompts[first])
    agree = float(np.mean(theirs[:, :ours_greedy.shape[1]] == ours_greedy))
    result = {"greedy_token_agreement": agree, "tokens_per_s": {}, "ours_tokens_per_s": {}, "pair_speedups": {}}
    for batch, toks in prompts.items():
        ours[batch](), run(toks)  # compile / warm up
        best, pairs = [float("inf")] * 2, []
        for _ in range(repeats):
            times = []
            for fn in (ours[batch], lambda: run(toks)):
                # Each side's timed run follows an untimed one of its own, as in the HF comparison
                # (`sampling.bench_decode_vs_hf`): a call right after the other side's ran slower.
                fn()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best = [min(b, t) for b, t in zip(best, times)]
            pairs.append(times[1] / times[0])
        result["ours_tokens_per_s"][batch], result["tokens_per_s"][batch] = (batch * new / t for t in best)
        result["pair_speedups"][batch] = pairs
    return result
