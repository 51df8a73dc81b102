#!/usr/bin/env bash
# Runs one glore_jax training job on every worker of a TPU pod slice.
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.key=value ...]
#   bash launch/tpu_pod.sh glore-v4-64 us-central2-b configs/gsm8k_llama2_7b.py:sorm \
#        --config.workdir=/mnt/glore/7b/sorm
#
# Every host runs the same command; GLORE_DISTRIBUTED=1 makes each call
# jax.distributed.initialize(), which reads coordinator and process ids from
# the TPU metadata. The workdir must be one shared POSIX path on every host
# (a Filestore/NFS or gcsfuse mount), so all hosts write one checkpoint; the
# trainer's side files use plain file I/O, so gs:// URLs are not accepted. Assumes the repo is checked out at ~/glore_jax
# on every worker with `pip install -e .` done (see README); SIGTERM from a
# preemption is turned into a checkpoint, and rerunning this resumes.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3
shift 3
ARGS=$(printf ' %q' "$@")
gcloud alpha compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/glore_jax && GLORE_DISTRIBUTED=1 python3 -m glore_jax.train --config=$(printf '%q' "$CONFIG")$ARGS
"
