#!/usr/bin/env bash
# Copies a run (or sweep) directory back from worker 0 of the TPU, where process 0 wrote
# metrics.jsonl, TensorBoard files, eval/step_N/ reports and the export/ model.
#
# Usage: tpu_scripts/fetch.sh [--help] REMOTE_WORKDIR [LOCAL_DIR]
#
#   REMOTE_WORKDIR  the WORKDIR given to launch.sh
#   LOCAL_DIR       where to put it [./<basename of REMOTE_WORKDIR>]
#
# Environment: TPU_NAME [toolr1], TPU_ZONE [us-central2-b], TPU_PROJECT [gcloud's default],
#   TPU_FETCH_CHECKPOINTS [false]  true: also copy checkpoints/ directories (large).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac
if (($# < 1 || $# > 2)); then usage >&2; exit 2; fi

TPU_NAME="${TPU_NAME:-toolr1}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_FETCH_CHECKPOINTS="${TPU_FETCH_CHECKPOINTS:-false}"
remote_dir="$1"
local_dir="${2:-$(basename "$remote_dir")}"

common=("--zone=$TPU_ZONE")
if [[ -n "$TPU_PROJECT" ]]; then common+=("--project=$TPU_PROJECT"); fi
exclude=""
if [[ "$TPU_FETCH_CHECKPOINTS" != true ]]; then exclude="--exclude=checkpoints"; fi

mkdir -p "$local_dir"
echo "Fetching $TPU_NAME:$remote_dir (worker 0) into $local_dir..."
# One tar stream over ssh: skips checkpoints and works on a half-finished run.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=0 "${common[@]}" \
  --command="tar -C $(printf '%q' "$remote_dir") $exclude -czf - ." -- -q |
  tar -C "$local_dir" -xzf -
echo "Fetched. Plot: python plot.py --workdir=$local_dir"
