"""What every benchmark reports besides its figures: the CPU, its bf16 support, how a time is taken, and
where the torch peer runs (beside JAX: on the GPU when JAX runs on one)."""

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


def matmul_shape(platform: str) -> tuple[int, int, int]:
    """(m, k, n) of the peak measurement. On a CPU [1024, 4096] x [4096, 1024], ~8.6 GFLOP (20-40 ms on 2
    cores); on an accelerator 8192 cubed, ~1.1 TFLOP (~1.4 ms on an H200 in bf16), so that a call's launch
    and host sync (tens of microseconds) stay near 1% of it instead of most of it."""
    return (1024, 4096, 1024) if platform == "cpu" else (8192, 8192, 8192)


def matmul_gflops(dtype: str, repeats: int) -> float:
    """This machine's practical matmul rate in `dtype` (float32 accumulation) on JAX's first device, GFLOP/s.
    float32 runs at JAX's default precision, which is TF32 on NVIDIA GPUs since Ampere (`torch_setup`)."""
    import jax
    import jax.numpy as jnp
    m, k, n = matmul_shape(jax.devices()[0].platform)
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * m * k * n / best_time(lambda: f(a, b).block_until_ready(), repeats) / 1e9


def torch_device(jax_platform: str) -> str:
    """Where the torch peer runs: on the GPU when JAX runs on one (a GPU figure against torch on the
    host CPU would say nothing), else on the CPU."""
    return "cuda" if jax_platform == "gpu" else "cpu"


def torch_setup(torch, device: str):
    """Sets torch up as the peer on `device` and returns a `sync()` to call before a timer stops.

    On the CPU: every core this process may run on (its affinity set, as XLA's pool sizes itself; not
    `os.cpu_count()`, which under `taskset -c 0,1` on a 16-CPU host would oversubscribe 2 cores).
    On CUDA: float32 matmuls in TF32, which is what XLA runs a float32 dot at by default on NVIDIA
    GPUs since Ampere (torch defaults to full float32), so that both sides do the same arithmetic;
    CUDA work is asynchronous, so a timed call ends at a sync."""
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
        return torch.cuda.synchronize
    from glore_jax import hardware
    torch.set_num_threads(hardware.host_cores())
    return lambda: None


def torch_matmul_gflops(torch, device: str, dtype: str, repeats: int, sync) -> float:
    """`matmul_gflops`, the same shape, on torch's side."""
    m, k, n = matmul_shape("gpu" if device == "cuda" else "cpu")
    a = torch.ones(m, k, dtype=getattr(torch, dtype), device=device)
    b = torch.ones(k, n, dtype=getattr(torch, dtype), device=device)

    def run():
        a @ b
        sync()
    return 2 * m * k * n / best_time(run, repeats) / 1e9


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
    from glore_jax import hardware
    return {"cpu": model, **ids, "cpu_count": os.cpu_count(), "usable_cores": hardware.host_cores(),
            "native_bf16": bool(native), "bf16_flags": native, "avx2": "avx2" in flags,
            # AVX-512 CPUs compile the per-core decode loops for 512-bit vectors (`hardware.decode_compiler_options`).
            "avx512f": "avx512f" in flags, "machine": platform.machine(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def save(results: dict, path: str | None) -> None:
    """Writes the figures as JSON when `--out` was given."""
    if path:
        pathlib.Path(path).write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")
