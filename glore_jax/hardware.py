"""What this machine computes fastest in, and how XLA should compile training for it.

`model.dtype = "auto"` follows one rule (`dtype_for`):
  TPU, GPU  bfloat16: native there.
  any CPU   float32, for results that compare across machines. bf16 is not
            slower everywhere any more (`models.layers.dense` keeps bf16 dots
            in bf16 on CPUs with AVX512-BF16 or AMX): on a 2-core Xeon with
            AMX-BF16 (2026-12-02, f8582dd) the demo model's train step ran at
            22.2-23.4k bf16 against 18.7-19.3k float32 tokens/s and decode at
            batch 32 at 12.7-13.0k against 8.4-8.8k, and a bf16 demo (seed 0)
            took 16 min 21 s against 18 min 29 s. But its policy came out a
            different one (greedy 67.2% against 55.0%: above the 45-65% band the
            recipe is set for), and the demo's fidelity table is float32. On the
            AVX512-BF16 AMD EPYC a bf16 demo was not faster (14:30 against
            13:29); AVX2-only CPUs emulate bf16. `model.dtype=bfloat16` opts in.
            Measured again on the slow AVX512-BF16 EPYC (2026-12-03, two XLA
            devices): bf16 is faster there now (train step 17.1-19.7k against
            14.8-15.7k tokens/s; demo seed 0 17:49 against 20:24), but a bf16
            demo is another run with other results: of three bf16 seeds, seed
            2's SORM ranked steps below its ORM (0.683 against 0.688), which no
            float32 seed of the current table does. The rule stays float32 so
            that the README's table is what `auto` reproduces.
A micro-benchmark was tried instead of a rule and rejected: a one-second
MLP fwd+bwd said bf16 was 1.75x faster on the EPYC, where whole steps were then even.
The pipeline resolves "auto" once per workdir and records it, so a resumed
run never switches dtype.
"""

from __future__ import annotations

import functools
import os
import sys

import jax

# XLA options for training on XLA:CPU: its defaults, which hand dots and
# reductions (norms, softmax sums) to YNNPACK, except for bf16 where the CPU
# emulates it. History: on 2026-11-30 YNNPACK's dots ran the float32 training
# matmuls at half XLA's own speed ([5632, 128] x [128, 384] at ~105 against ~200
# GFLOP/s), so float32 steps compiled with them off, and bf16 steps on CPUs
# with AVX512-BF16 or AMX with YNNPACK's single dots only (the only XLA:CPU path
# then that kept a bf16 x bf16 -> f32 dot in bf16; `models.layers.dense`). With
# today's model code and jax, XLA's defaults beat both (`benchmarks/
# train_options.py`, the demo model's step, two XLA devices, alternating,
# 2026-12-04): 2-core AMD EPYC Zen 5, float32 1.05-1.11x over YNNPACK off (four
# runs), bf16 1.05x over single dots (two runs); 2-core Xeon with AMX, 1.04x in
# both dtypes (one run each; one XLA device: 1.00x). Most of the gain is the
# reductions: XLA:CPU otherwise splits every sum into 32-wide reduce-windows
# (its tree-reduction pass), ~12% of a float32 step's kernel time in
# `benchmarks/step_profile.py`. Not measured on an AVX2-only CPU.
CPU_TRAIN_OPTIONS_EMULATED_BF16 = {"xla_cpu_experimental_ynn_fusion_type": ""}


# glibc's malloc hands large freed blocks back to the kernel and faults them in again, 4 KiB at a
# time, on the next step's allocation: a demo-model train step (2-core AMD EPYC, 2026-12-01) took
# ~110k minor page faults (~430 MB) and ~0.19 s of kernel time against ~0.43 s of user time. With
# this tunable malloc asks for transparent huge pages (madvise), and the same step took ~700 faults,
# ~0.04 s of kernel time and ~30% less wall time. glibc reads tunables only when a process starts,
# so the command lines restart themselves once with it (`reexec_with_launch_env`). Where THP is
# off (`/sys/kernel/mm/transparent_hugepage/enabled` = never) or libc is not glibc it does nothing.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def malloc_env(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with MALLOC_TUNABLE added to GLIBC_TUNABLES; None when it names a hugetlb setting already
    (a user's own choice, or this process was restarted with it)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{MALLOC_TUNABLE}" if tunables else MALLOC_TUNABLE}


# XLA:CPU runs one device's program as a sequence of kernels, most of them small (a demo-model train
# step is ~500: elementwise passes, reductions, [64, 352, 32] x [64, 32, 176] attention products), and
# splits each across the host's threads, so a 2-core host spends much of a step waiting at those
# splits: its batched attention matmuls ran at 110-150 GFLOP/s against 310-340 for torch's `bmm`
# (2-core Xeon with AMX, 2026-12-02). So the command lines split a CPU host into two XLA devices by
# default (GLORE_JAX_CPU_DEVICES=N asks for N; 1 keeps XLA's single device); the mesh is built over
# every device, as on a pod, so each holds a slice of the batch and the two kernel sequences run side
# by side. Measured on 2-core hosts only, which is why the default is 2 and not the core count: four
# devices trained slower than two on the Xeon. The demo (its ~1M `mini` model), seed 0, 1 -> 2
# devices: 18 min 29 s -> 15 min 20 s on the Xeon (SORM labelling 174 -> 113 s, policy SFT
# 160 -> 143 s); 25 min 58 s -> 22 min 50 s on a slow 2-core AMD EPYC (sampling stages 25-37%
# faster, the refiner's training not at all). Not a win everywhere: the train step of the demo model
# (`benchmarks/train.py --quick`, Xeon) 18.7k -> 19.6k tokens/s in float32 and 22.2k -> 28.3k in
# bf16, but decode of the larger 3.7M `demo` preset 8.4k -> 6.9k tokens/s at batch 32. A mesh over two
# devices reduces in another order than one, so a run's numbers depend on the count: the pipeline
# records it in `hardware.json` and warns when a workdir resumes on another. Accelerator hosts are
# unaffected: the flag sizes only the CPU platform.
DEFAULT_CPU_DEVICES = 2
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_devices_env(environ: dict[str, str], cpus: int | None = None) -> dict[str, str] | None:
    """`environ` with XLA_FLAGS asking for GLORE_JAX_CPU_DEVICES host devices (unset: DEFAULT_CPU_DEVICES,
    at most one per core of `cpus`, `host_cores()` by default); None when that is one (XLA's own count) or
    XLA_FLAGS names a count already (a user's, a test harness's, or this process's own after its restart)."""
    wanted = environ.get("GLORE_JAX_CPU_DEVICES", "").strip()
    flags = environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG in flags:
        return None
    if wanted and not (wanted.isdigit() and int(wanted) >= 1):
        raise ValueError(f"GLORE_JAX_CPU_DEVICES must be a positive integer, got {wanted!r}")
    count = int(wanted) if wanted else min(DEFAULT_CPU_DEVICES, cpus or host_cores())
    if count == 1:
        return None
    return {**environ, "XLA_FLAGS": f"{flags} {_DEVICE_COUNT_FLAG}={count}".strip()}


def launch_env(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with what a command line runs best under (the malloc tunable, the CPU device count);
    None when there is nothing to add."""
    env = malloc_env(environ) or environ
    env = cpu_devices_env(env) or env
    return None if env == environ else env


def reexec_with_launch_env() -> None:
    """Restarts this command line (same PID, same arguments) under `launch_env`, at most once.

    For entry points only, before any work: everything done so far is discarded.
    GLORE_JAX_NO_REEXEC=1 turns it off."""
    env = launch_env(dict(os.environ))
    if env is None or not sys.platform.startswith("linux") or os.environ.get("GLORE_JAX_NO_REEXEC") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.executable, not orig_argv[0]: a bare "python" would be looked up on PATH, maybe outside the venv.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def train_compiler_options(platform: str, dtype: str = "float32") -> dict[str, str] | None:
    """The train step's XLA options for a platform and compute dtype (None: XLA's defaults)."""
    if platform == "cpu" and dtype == "bfloat16" and not cpu_bf16_flags():
        return dict(CPU_TRAIN_OPTIONS_EMULATED_BF16)  # unchanged since 2026-12-02: not remeasured
    return None


# A data-parallel decode loop (`sampling.Sampler`, one loop per device) on a CPU host split into at
# least one XLA device per core: each device's small per-step kernels (a [16, 256] x [256, 1536]
# product is ~40 us) are split again across the host's thread pool, so the devices' loops wait on
# each other's threads at every kernel. With these options every kernel of the loop runs on its
# device's own thread: XLA's own dot emitter instead of YNNPACK's (whose kernels always use the pool),
# and single-threaded Eigen. Measured on a 2-core AMD EPYC Zen 5 (2026-12-03, two devices, 15
# alternating runs of 32 / 128 new tokens, median ratio of tokens/s): 16 rows per device (batch 32)
# 1.23x / 1.14x on the 3.7M `demo` preset, 1.08x / 1.22x on the `mini` model; 4-8 rows 1.3x. With
# 32 rows per device it is a toss-up by shape (`demo` 1.08x / 0.98x, `mini` 1.15x / 1.11x, and
# 0.92x at the demo pipeline's 64 x 224-token prompts), where YNNPACK's pooled kernels earn
# their split: so only loops of up to DECODE_PER_CORE_MAX_ROWS rows per device use them.
CPU_DECODE_PER_CORE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_multi_thread_eigen": False}
DECODE_PER_CORE_MAX_ROWS = 16
# The per-core loops are also compiled for 512-bit vectors where the CPU has AVX-512 (XLA:CPU asks
# LLVM for 256 by default). Their step is ~160 small kernels: elementwise passes, reductions and
# [G, D] x [D, S] attention products per row, which run far below the weight matmuls' rate, and
# wider vectors speed those up. On the 2-core Zen 5 EPYC (2026-12-04, demo preset, two devices,
# alternating in one process, call time 256-bit / 512-bit, fastest and median): batch 64 with 128
# new tokens 1.06x / 1.12x (a second run 1.10x by median), batch 32 1.13x / 1.10x; with 32 new tokens
# batch 64 1.03x / 1.02x; the demo pipeline's 64 x 224-token prompts + 96 new 1.03x / 1.00x; the
# `mini` preset, batch 32, 32 new 1.04x / 1.05x. Not for the
# pooled loops (0.97x at 48 rows a device, whose YNNPACK kernels gain nothing) nor the float32 train
# step (169.3 against 169.4 ms). Kernels that reduce in another order: logprobs move by ~2e-6
# against the 256-bit program. Not measured on an AVX-512 Xeon; AVX2-only CPUs are unaffected.
CPU_DECODE_WIDE_VECTOR_OPTIONS = {"xla_cpu_prefer_vector_width": 512}
# A bf16 decode loop on a CPU with native bf16 (AVX512-BF16 or AMX) keeps YNNPACK's fusions (XLA's
# default) in the per-core program: XLA's own dot emitter runs a bf16 x bf16 -> float32 product by
# converting both operands, the whole weight included, to float32 at every step, while YNNPACK's
# kernels multiply bf16 natively. On the 2-core Zen 5 EPYC (2026-12-04, demo preset, two devices,
# 7 alternating rounds, call time without / with, fastest and median): batch 8 1.51x / 1.41x, batch
# 32 1.22x / 1.23x, batch 64 1.23x / 1.25x with 32 new tokens, batch 32 1.16x / 1.19x with 128; the
# same with Eigen's pool as well, 1.19x / 1.14x at batch 32. Float32 loops lose with YNNPACK there
# (0.75x at batch 32), and where the CPU emulates bf16 the kernels have nothing native to use, so
# both keep CPU_DECODE_PER_CORE_OPTIONS. bf16 kernels sum in another order: greedy tokens of a random
# model parted from the other program's in 9-18% of its rows. Not measured on an AMX Xeon.
CPU_DECODE_PER_CORE_NATIVE_BF16_OPTIONS = {"xla_cpu_multi_thread_eigen": False}
# Loops of DECODE_PER_CORE_MAX_ROWS + 1 .. DECODE_GROUP_MAX_ROWS rows a device decode instead in
# groups of DECODE_PER_CORE_MAX_ROWS rows a device, one group after another, each in the per-core
# program (`Sampler.group_size`). Measured on the same Zen 5 after 365a647 (demo preset, two devices,
# 9 alternating runs, median ratio of time, one call / groups): 32 rows a device 1.14x at 32 new
# tokens, 1.10x at 128, 1.12x at the demo pipeline's 64 x 224-token prompts + 96 new; 48 rows
# 0.96x and 64 rows 0.96x, where one loop's larger products win back more than the groups save.
DECODE_GROUP_MAX_ROWS = 32


def host_cores() -> int:
    """The cores this process may run on (its affinity set, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def decode_compiler_options(devices: list, dtype: str = "float32") -> dict[str, str | bool] | None:
    """XLA options for a data-parallel decode loop over `devices` with few rows each (None: XLA's defaults).

    CPU_DECODE_PER_CORE_OPTIONS (CPU_DECODE_PER_CORE_NATIVE_BF16_OPTIONS for a bfloat16 compute
    `dtype` on a CPU with native bf16), plus CPU_DECODE_WIDE_VECTOR_OPTIONS on a CPU with AVX-512,
    where `devices` are CPU devices, at least one per core; elsewhere (accelerators, or a few devices
    on a many-core host, whose loops need the pool's threads) None.
    """
    if not devices or devices[0].platform != "cpu" or len(devices) < host_cores():
        return None
    native_bf16 = str(dtype) == "bfloat16" and bool(cpu_bf16_flags())
    per_core = CPU_DECODE_PER_CORE_NATIVE_BF16_OPTIONS if native_bf16 else CPU_DECODE_PER_CORE_OPTIONS
    wide = CPU_DECODE_WIDE_VECTOR_OPTIONS if "avx512f" in cpu_flags() else {}
    return {**per_core, **wide}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The feature flags this CPU reports in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_bf16_flags() -> list[str]:
    """The native bf16 matmul flags this CPU reports (amx_bf16, avx512_bf16), from /proc/cpuinfo."""
    return sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def dtype_for(platform: str) -> str:
    """The rule: 'bfloat16' on accelerators, 'float32' on every CPU (see the module docstring)."""
    return "float32" if platform == "cpu" else "bfloat16"


@functools.lru_cache(maxsize=1)
def fastest_dtype() -> str:
    """`dtype_for` this process's devices."""
    return dtype_for(jax.devices()[0].platform)
