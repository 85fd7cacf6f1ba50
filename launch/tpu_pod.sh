#!/usr/bin/env bash
# Run an arcstream job on every host of a Cloud TPU pod (one process per host).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a bash launch/tpu_pod.sh \
#       python -m arcstream.run --config=configs/default.py --config.model=Qwen/Qwen2.5-0.5B \
#       --config.output_dir=gs://my-bucket/runs/qwen05
#
# Every worker must have the repository at the same path (REPO_DIR) and the
# package installed (`bash launch/tpu_pod.sh --setup` does both from the
# current git remote). JAX discovers the pod by itself (ARCSTREAM_DISTRIBUTED=auto
# makes arcstream call jax.distributed.initialize() with auto-detection).
# Use a gs:// (or other shared) output_dir: each host writes its own arrays.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"; : "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=${REPO_DIR:-~/arcstream}
if [ "${1:-}" = "--setup" ]; then
  REMOTE=$(git remote get-url origin)
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command \
    "set -e; [ -d $REPO_DIR ] || git clone $REMOTE $REPO_DIR; cd $REPO_DIR && git pull --ff-only && \
     python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . && pip install -q 'jax[tpu]'"
  exit 0
fi
[ $# -gt 0 ] || { echo "usage: $0 [--setup] | COMMAND..." >&2; exit 2; }
CMD=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command \
  "cd $REPO_DIR && . .venv/bin/activate && ARCSTREAM_DISTRIBUTED=auto $CMD"
