#!/usr/bin/env bash
# The two benchmarks on a GPU host: JAX on the GPU, and the torch / HF peers (and tunix's sampler,
# where it imports) on the same GPU (`benchmarks/common.torch_setup`). Each stage has its own time
# limit, so one that hangs or fails leaves the others' figures; everything printed goes to OUT/log.txt.
#
#   bash benchmarks/gpu.sh OUT_DIR                                 # the GPU stages
#   STAGES=train_quick_hostcpu_2cores bash benchmarks/gpu.sh OUT_DIR  # the host CPU, 2 cores
#   STAGES=train_options_hostcpu_2cores bash benchmarks/gpu.sh OUT_DIR  # its float32 step's options
#   STAGES=sampling_quick_hostcpu_2cores bash benchmarks/gpu.sh OUT_DIR  # its sampler, against HF and tunix
#
# Needs jax with CUDA, torch with CUDA, transformers and the project's own imports. The packing
# figures are left out (`--no-packing`): they are a property of the data, measured on CPU hosts,
# and their loader needs the data extras (grain, tensorflow-datasets) that GPU images often lack.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
# The torch peers run in child processes on the same GPU while this process holds its buffers:
# JAX must not take 75% of the GPU's memory up front, as it does by default.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1

two_cores() {  # two logical CPUs on distinct physical cores (or CPU_CORES=a,b), printed to the log
  local cores=${CPU_CORES:-$(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -u | head -2 | cut -d, -f1 | paste -sd,)}
  echo "host CPUs $cores: $(lscpu -p=CPU,CORE,SOCKET | grep -E "^(${cores/,/|}),")" >&2
  echo "$cores"
}

stage() {  # NAME SECONDS COMMAND...: one benchmark run, its JSON at OUT/NAME.json
  local name=$1 secs=$2
  shift 2
  echo "== $name: start $(date -u +%T), limit ${secs}s"
  timeout "$secs" "$@" --out "$out/$name.json"
  echo "== $name: exit $? at $(date -u +%T)"
}

# The stages to run, in order (STAGES="a b ..."); the first three are the default (~10 minutes on an
# H200 host, 2026-12-04), which fills one 10-minute call of this workplace's device tool.
stages=${STAGES:-"sampling_quick train_quick train_quick_7bwide_2layers"}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| torch',
torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__)"
  for s in $stages; do
    case $s in
      # The demo preset's sampler (3.7M parameters) and the demo's model in training (1.05M): what the
      # CPU figures are measured on, so the two can be read side by side.
      sampling_quick) stage "$s" "${SAMPLING_S:-300}" "$py" benchmarks/sampling.py --quick ;;
      train_quick) stage "$s" "${TRAIN_S:-240}" "$py" benchmarks/train.py --quick --no-packing ;;
      # A model big enough for a GPU's arithmetic to show: LLaMA-2 7B's widths, 2 layers (~0.67B
      # parameters with its 32k untied embeddings); torch eager only, to fit a short lease.
      train_quick_7bwide_2layers) stage "$s" "${TRAIN_BIG_S:-200}" "$py" benchmarks/train.py --quick --no-packing \
        --preset llama2_7b --layers 2 --torch_modes eager ;;
      # The host's own CPU on two of its cores, as a 2-core development machine: GPU hosts here have been
      # AMX Xeons, where the float32 train step has been short of 1.2x torch eager (README, issue 14).
      # Two logical CPUs on distinct physical cores (CPU_CORES=a,b to choose), so that the two XLA
      # devices and torch's two threads do not share one core's units as hyperthread siblings.
      train_quick_hostcpu_2cores)
        cores=$(two_cores)
        JAX_PLATFORMS=cpu stage "$s" "${CPU_TRAIN_S:-240}" taskset -c "$cores" "$py" \
        benchmarks/train.py --quick --no-packing ;;
      # The sampler benchmark on the same cores, tunix included where it imports: decode on an AMX Xeon
      # was last measured at f8582dd (1.30-1.41x HF), before the per-core loops (7502e5a-0736c33) and
      # the bf16 loops' native kernels (3bdfb87), which reach AMX there.
      sampling_quick_hostcpu_2cores)
        cores=$(two_cores)
        JAX_PLATFORMS=cpu stage "$s" "${CPU_SAMPLING_S:-300}" taskset -c "$cores" "$py" benchmarks/sampling.py --quick ;;
      # The same cores, the float32 step under candidate options for that Xeon, alternating: 512-bit
      # vectors for XLA's own (elementwise) kernels, where the Xeon profile found the gap; oneDNN's dots;
      # and the attention as one query block (before 10c3d17).
      train_options_hostcpu_2cores)
        cores=$(two_cores)
        JAX_PLATFORMS=cpu stage "$s" "${CPU_OPTIONS_S:-300}" taskset -c "$cores" "$py" \
        benchmarks/train_options.py --dtype float32 --query_blocks 1000000 --variants \
        '{"wide512": {"xla_cpu_prefer_vector_width": 512}, "onednn_dot": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}}' ;;
      # The 16-bit dense backward's two forms (plain products vs 3-D views) at 7B widths: see the script.
      dense_grads_7bwide_2layers) stage "$s" "${DENSE_S:-200}" "$py" benchmarks/dense_grads.py --preset llama2_7b \
        --layers 2 ;;
      train_quick_7bwide_2layers_compile) stage "$s" "${TRAIN_BIG_S:-300}" "$py" benchmarks/train.py --quick \
        --no-packing --preset llama2_7b --layers 2 --torch_modes eager,compile ;;
      *) echo "unknown stage $s" ;;
    esac
  done
} 2>&1 | tee "$out/log.txt"
