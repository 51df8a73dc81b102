"""What every benchmark reports besides its figures: the CPU, its bf16 support, and how a time is taken."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import time


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` timed runs after a warm-up: on a shared machine, noise only adds time,
    so the minimum is the steadiest estimate (as `timeit` reports it), for every framework alike."""
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops(dtype: str, repeats: int) -> float:
    """This machine's practical matmul rate in `dtype` (float32 accumulation), [1024, 4096] x [4096, 1024], GFLOP/s."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((1024, 4096), dtype)
    b = jnp.ones((4096, 1024), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * 1024 * 4096 * 1024 / best_time(lambda: f(a, b).block_until_ready(), repeats) / 1e9


def cpu_info() -> dict:
    """The CPU model and whether it multiplies bf16 natively (AMX-BF16 or AVX512-BF16) or emulates it.

    Family and model numbers go with the name because a cloud's "AMD EPYC" names several generations:
    family 25 is Zen 3/4, family 26 Zen 5, and their matmul rates differ by 2x."""
    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() in ("CPU family", "Model"):
                ids["cpu_family" if key.strip() == "CPU family" else "cpu_model_id"] = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    return {"cpu": model, **ids, "cpu_count": os.cpu_count(), "native_bf16": bool(native), "bf16_flags": native,
            "avx2": "avx2" in flags,
            # AVX-512 CPUs compile the per-core decode loops for 512-bit vectors (`hardware.decode_compiler_options`).
            "avx512f": "avx512f" in flags, "machine": platform.machine(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def save(results: dict, path: str | None) -> None:
    """Writes the figures as JSON when `--out` was given."""
    if path:
        pathlib.Path(path).write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")
