#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host) or pod slice (several hosts) for toolr1_jax.
#
# Usage: tpu_scripts/create.sh [--help]
#
# Settings come from environment variables (defaults in brackets):
#   TPU_NAME      [toolr1]                 the TPU's name (the other scripts use it too)
#   TPU_ZONE      [us-central2-b]          a zone that offers TPU_TYPE
#   TPU_TYPE      [v4-8]                   accelerator type: v4-8 is one host, v4-32 a 4-host pod
#                                          slice; v5litepod-8, v6e-8, ... elsewhere
#   TPU_RUNTIME   [tpu-ubuntu2204-base]    TPU software version (v5e: v2-alpha-tpuv5-lite,
#                                          v6e: v2-alpha-tpuv6e)
#   TPU_PROJECT   [gcloud's default]       Google Cloud project
#   TPU_SPOT      [false]                  true: a Spot TPU (cheaper, can be preempted)
#
# Then: tpu_scripts/setup.sh, tpu_scripts/launch.sh, tpu_scripts/fetch.sh.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  "") ;;
  *) usage >&2; exit 2 ;;
esac

TPU_NAME="${TPU_NAME:-toolr1}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_TYPE="${TPU_TYPE:-v4-8}"
TPU_RUNTIME="${TPU_RUNTIME:-tpu-ubuntu2204-base}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_SPOT="${TPU_SPOT:-false}"

args=(compute tpus tpu-vm create "$TPU_NAME" "--zone=$TPU_ZONE" "--accelerator-type=$TPU_TYPE"
  "--version=$TPU_RUNTIME")
if [[ -n "$TPU_PROJECT" ]]; then args+=("--project=$TPU_PROJECT"); fi
if [[ "$TPU_SPOT" == true ]]; then args+=(--spot); fi

echo "Creating TPU $TPU_NAME ($TPU_TYPE, $TPU_RUNTIME) in $TPU_ZONE..."
gcloud "${args[@]}"
echo "Created. Next: tpu_scripts/setup.sh"
