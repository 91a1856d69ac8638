#!/usr/bin/env bash
# The GPU check of issue 17, in one run of at most 9 minutes on one H100/H200: at Qwen2.5-0.5B's
# and -1.5B's dimensions (random weights, bfloat16), the engine's decode tokens/s and its
# fraction of the HBM bandwidth, the GRPO update's model FLOP/s over the device's measured
# bfloat16 matmul throughput (MFU), and the shared-prefix prefill gain. Every limit is measured
# in the same run (benchmarks/common.py). Goals: update >= 40% MFU, decode >= 60% of HBM.
#
#   benchmarks/gpu_check.sh            # on the GPU machine, from anywhere in the checkout
#   benchmarks/gpu_check.sh --smoke    # the same steps at the tiny preset, e.g. on a CPU
#
# It imports the project from the checkout (PYTHONPATH) with its dependencies (JAX with CUDA,
# flax, optax, transformers, torch, ml_collections, gguf, tensorflow-datasets, openai, ...): what
# the three benchmarks cannot import is named before any step runs. The steps share one
# time budget (GPU_CHECK_SECONDS, 540 s, under a 10-minute limit per command); a step that fails
# or runs out of it is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--smoke" ]; then
  small=tiny large=tiny update_shape=(--batch=2 --tokens=128)
  prefill_shape=(--questions=2 --group=2) decode_shape=("--batch=16,32" --new_tokens=8)
else
  small=qwen2.5-0.5b large=qwen2.5-1.5b update_shape=(--batch=8 --tokens=1024)
  prefill_shape=() decode_shape=(--batch=32)
fi
end=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))

missing=$("$PYTHON" - <<'EOF'
import importlib
import sys

sys.path.insert(0, "benchmarks")
for name in ("bench_decode", "bench_update", "bench_prefill"):  # the first missing of each
    try:
        importlib.import_module(name)
    except ImportError as e:
        print(f"{name}: {e}")
try:  # the prefill step's prompts are the demo's, tokenized by SmolLM2's tokenizer
    from toolr1_jax.models import sources
    sources.locate("smollm2-135m-instruct")
except Exception as e:
    print(f"the SmolLM2 tokenizer: {e}")
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_check: cannot import:"
  echo "$missing"
  exit 2
fi
"$PYTHON" -c 'import jax; print("devices:", jax.devices())'

failed=()
step() {  # step NAME COMMAND...: runs COMMAND in what is left of the budget, notes a failure
  local name=$1 left=$((end - SECONDS))
  shift
  echo "=== $name"
  if [ $left -le 0 ]; then
    echo "=== $name SKIPPED (no time left)"
    failed+=("$name")
    return
  fi
  timeout "$left" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "=== $name FAILED (exit $rc$([ $rc = 124 ] && echo ", out of time"))"
    failed+=("$name")
  fi
}

step "decode, $small, bfloat16" "$PYTHON" benchmarks/bench_decode.py --preset="$small" \
  --dtype=bfloat16 --skip_hf --repeats=2 "${decode_shape[@]}"
for preset in "$small" "$large"; do
  step "update, $preset, bfloat16" "$PYTHON" benchmarks/bench_update.py --preset="$preset" \
    --dtype=bfloat16 --skip_torch --remat=none --steps=3 --repeats=1 "${update_shape[@]}"
done
step "shared-prefix prefill, $small, bfloat16" "$PYTHON" benchmarks/bench_prefill.py \
  --preset="$small" --dtype=bfloat16 "${prefill_shape[@]}"

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed steps: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps ran"
