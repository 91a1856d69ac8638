#!/usr/bin/env bash
# Puts toolr1_jax on every worker of the TPU and installs it with `pip install -e ".[tpu]"`.
#
# Usage: tpu_scripts/setup.sh [--help] [GIT_URL [GIT_REF]]
#
#   without GIT_URL  copies this checkout (tracked and untracked, not ignored, files; local edits
#                    included) to every worker
#   with GIT_URL     every worker clones GIT_URL (or fetches, if already cloned) and checks out
#                    GIT_REF [main]
#
# Environment: TPU_NAME [toolr1], TPU_ZONE [us-central2-b], TPU_PROJECT [gcloud's default],
#   TPU_REMOTE_DIR [toolr1_jax]  the checkout on each worker, relative to the home directory.
# Run it again after local changes: it copies the code over the old copy and reinstalls.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  -*) usage >&2; exit 2 ;;
esac
if (($# > 2)); then usage >&2; exit 2; fi

TPU_NAME="${TPU_NAME:-toolr1}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_REMOTE_DIR="${TPU_REMOTE_DIR:-toolr1_jax}"
GIT_URL="${1:-}"
GIT_REF="${2:-main}"

common=("--zone=$TPU_ZONE")
if [[ -n "$TPU_PROJECT" ]]; then common+=("--project=$TPU_PROJECT"); fi
dir_q="$(printf '%q' "$TPU_REMOTE_DIR")"
install="cd $dir_q && python3 -m pip install -q -e '.[tpu]'"

if [[ -n "$GIT_URL" ]]; then
  url_q="$(printf '%q' "$GIT_URL")"
  ref_q="$(printf '%q' "$GIT_REF")"
  remote="set -e; if [ -d $dir_q/.git ]; then git -C $dir_q fetch -q origin;"
  remote+=" else git clone -q $url_q $dir_q; fi; git -C $dir_q checkout -q $ref_q;"
  # A branch moves on with the remote; a tag or commit has nothing to pull.
  remote+=" git -C $dir_q pull -q --ff-only 2>/dev/null || true; $install"
else
  repo_root="$(cd "$(dirname "$0")/.." && pwd)"
  archive="$(mktemp "${TMPDIR:-/tmp}/toolr1_jax.XXXXXX")"
  trap 'rm -f "$archive"' EXIT
  # Files git would commit (tracked or new, not ignored), less those deleted in the checkout.
  (cd "$repo_root" && git ls-files --cached --others --exclude-standard -z |
    while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done |
    tar --null -T - -czf "$archive")
  echo "Copying $repo_root to $TPU_NAME:~/$TPU_REMOTE_DIR on every worker..."
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:toolr1_jax_src.tgz" --worker=all \
    "${common[@]}"
  # Unpacked over an earlier copy rather than replacing it: runs may live inside it.
  remote="set -e; mkdir -p $dir_q; tar -xzf toolr1_jax_src.tgz -C $dir_q;"
  remote+=" rm toolr1_jax_src.tgz; $install"
fi

echo "Installing on every worker of $TPU_NAME..."
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${common[@]}" --command="$remote"
echo "Set up. Next: tpu_scripts/launch.sh CONFIG WORKDIR"
