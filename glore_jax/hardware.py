"""What this machine computes fastest in, and how XLA should compile training for it.

`model.dtype = "auto"` follows one rule (`fastest_dtype`):
  TPU, GPU          bfloat16: native there.
  CPU with AMX-BF16 bfloat16: on such a Xeon (2 cores) a demo-model train step
                    ran 1.35x its float32 speed (issue 14's measurements).
  any other CPU     float32. With AVX512-BF16 (the AMD EPYC this was built on)
                    the step ran about even (13.1k vs 12.7k tokens/s in
                    `benchmarks/train.py --quick`), so bf16 would cost accuracy
                    for nothing; AVX2-only CPUs emulate bf16, slower than float32.
A micro-benchmark was tried instead of the flags and rejected: a one-second
MLP fwd+bwd said bf16 was 1.75x faster on the EPYC, where whole steps are even.
The pipeline resolves "auto" once per workdir and records it, so a resumed
run never switches dtype.
"""

from __future__ import annotations

import functools

import jax

# XLA options for training on XLA:CPU. Its YNNPACK fusions ran this project's
# training matmuls at about half the speed of XLA's own dots (a demo-model
# step: ~450 ms with them, ~400 ms without, float32 and bf16 alike; its
# [5632, 128] x [128, 384] products at ~105 against ~200 GFLOP/s), while the
# sampler's decode loop is faster with them: they are off for training only.
CPU_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def train_compiler_options(platform: str) -> dict[str, str] | None:
    return dict(CPU_TRAIN_OPTIONS) if platform == "cpu" else None


def cpu_bf16_flags() -> list[str]:
    """The native bf16 matmul flags this CPU reports (amx_bf16, avx512_bf16), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(set(flags) & {"amx_bf16", "avx512_bf16"})


@functools.lru_cache(maxsize=1)
def fastest_dtype() -> str:
    """'bfloat16' or 'float32', by the module's rule."""
    if jax.devices()[0].platform != "cpu":
        return "bfloat16"
    return "bfloat16" if "amx_bf16" in cpu_bf16_flags() else "float32"
