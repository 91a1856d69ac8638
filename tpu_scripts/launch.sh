#!/usr/bin/env bash
# Runs train.py on every worker of the TPU at once (one JAX process per host, joined by
# jax.distributed through --config.distributed.enabled=true).
#
# Usage: tpu_scripts/launch.sh [--help] CONFIG WORKDIR [TRAIN_FLAGS...]
#
#   CONFIG       as train.py takes it, relative to the checkout, e.g. configs/gaia.py
#   WORKDIR      run directory on the workers, e.g. /home/me/runs/gaia. Process 0 (worker 0)
#                writes metrics, evals and the export; on a multi-host slice checkpoints need a
#                directory every worker sees (a shared mount such as gcsfuse).
#   TRAIN_FLAGS  passed on to train.py, e.g. --config.total_steps=500
#
# Environment: TPU_NAME [toolr1], TPU_ZONE [us-central2-b], TPU_PROJECT [gcloud's default],
#   TPU_REMOTE_DIR [toolr1_jax] (the checkout setup.sh made),
#   TPU_DETACH [false]  true: start under nohup, logging to ~/toolr1_train.log on each worker,
#                       and return at once (the run survives a closed terminal).
#
# Example: tpu_scripts/launch.sh configs/gaia.py /home/me/runs/gaia \
#            --config.reward.judge_url=http://judge-host:8000/v1
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac
if (($# < 2)); then usage >&2; exit 2; fi

TPU_NAME="${TPU_NAME:-toolr1}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_REMOTE_DIR="${TPU_REMOTE_DIR:-toolr1_jax}"
TPU_DETACH="${TPU_DETACH:-false}"
config="$1"
workdir="$2"
shift 2

common=("--zone=$TPU_ZONE")
if [[ -n "$TPU_PROJECT" ]]; then common+=("--project=$TPU_PROJECT"); fi
# Every argument quoted for the remote shell, so values with spaces or quotes arrive intact.
train="python3 train.py $(printf '%q ' "--config=$config" "--workdir=$workdir" \
  --config.distributed.enabled=true "$@")"
train="${train% }"
remote="cd $(printf '%q' "$TPU_REMOTE_DIR") && "
if [[ "$TPU_DETACH" == true ]]; then
  remote+="nohup $train > ~/toolr1_train.log 2>&1 < /dev/null &"
else
  remote+="$train"
fi

echo "Launching on every worker of $TPU_NAME: $train"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${common[@]}" --command="$remote"
