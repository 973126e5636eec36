#!/usr/bin/env bash
# The GPU suite in one command, for a lent GPU machine (torch and triton preinstalled, no network), budgeted
# at 8 minutes on one H100/H200 including the build (the step limits below; not yet run on a GPU). It stops
# with a non-zero status at the first failing step:
#   env.txt         device, driver, torch/triton versions, date
#   build.log       the extension with its CUDA kernels for the visible GPU's architecture only (ptxas -v)
#   resources.log   each CUDA kernel's registers / spills / shared memory against its launch configuration
#   parity.log      every GPU test that is not a benchmark, once, with CROPFORMER_VERIFY=strict (a fast path
#                   that fails its self-test is an error, not a fallback), stopping at the first failure;
#                   a skipped GPU test fails the suite too (it would hide an unbuilt or unusable path),
#                   unless its reason matches the regex GPU_SUITE_ALLOWED_SKIPS (default: needs 2 GPUs)
#   bench.log       the GPU benchmarks only (-m "gpu and bench") -> bench_results.jsonl
#   summary.md      markdown of the benchmark records, ready for docs/BENCHMARKS.md
# Results go to $OUT (or ./gpu_results). Usage, in the repository root: bash scripts/gpu_suite.sh
# Limits per step (seconds), 8 minutes together: GPU_SUITE_BUILD_S (180), GPU_SUITE_PARITY_S (150),
# GPU_SUITE_BENCH_S (150); a step that runs out fails the suite.
#
# GPU_SUITE_DRY_RUN=1 runs the control flow without a GPU: each step prints its command and runs a stub
# instead, which fails for the step named in GPU_SUITE_FAIL (build, extension, resources, parity, skips,
# bench, summary); tests/test_gpu_suite.py checks that every failing step stops the suite.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
dry=${GPU_SUITE_DRY_RUN:-0}
start=$(date +%s)
python=${PYTHON:-python}

step() {  # step NAME LOG LIMIT_S COMMAND...: run COMMAND (output in $out/LOG); stop the suite if it fails
  local name=$1 log=$2 limit=$3 status=0
  shift 3
  echo "== [$(( $(date +%s) - start )) s] $name"
  if [ "$dry" = 1 ]; then
    { printf '[dry run]'; printf ' %q' "$@"; echo; } > "$out/$log"
    [ "${GPU_SUITE_FAIL:-}" != "$name" ] || status=1
  else
    timeout "$limit" "$@" > "$out/$log" 2>&1 || status=$?
  fi
  if [ "$status" -ne 0 ]; then
    tail -40 "$out/$log"
    [ "$status" -eq 124 ] && echo "(timed out after $limit s)"
    echo "GPU SUITE FAILED at step '$name' (exit $status); log: $out/$log"
    exit 1
  fi
}

# The visible GPU's architecture, e.g. 9.0 (an explicit TORCH_CUDA_ARCH_LIST wins): one arch keeps the build short.
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  arch=$TORCH_CUDA_ARCH_LIST
else
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  if [ -z "$arch" ] && [ "$dry" = 1 ]; then
    arch=9.0
  elif [ -z "$arch" ]; then
    arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") \
      || { echo "GPU SUITE FAILED: no GPU visible (nvidia-smi and torch.cuda found none)"; exit 1; }
  fi
fi
archs=$(echo "$arch" | tr ';' ' ' | sed 's/+PTX//g; s/\.//g')  # "8.0;9.0+PTX" -> "80 90"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  if [ "$dry" = 1 ]; then
    echo "DRY RUN (no GPU: stubs instead of the build and the tests)"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv 2>&1
    "$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  fi
  echo "TORCH_CUDA_ARCH_LIST=$arch"
} > "$out/env.txt"
cat "$out/env.txt"

export TRITON_INTERPRET=0 CROPFORMER_VERIFY=strict  # compiled Triton kernels; a failed self-test is an error
step build build.log "${GPU_SUITE_BUILD_S:-180}" \
  env CROPFORMER_BUILD_EXT=1 CROPFORMER_BUILD_CUDA=1 CROPFORMER_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="$arch" \
  MAX_JOBS="${MAX_JOBS:-16}" "$python" setup.py build_ext --inplace
step extension extension.log 60 \
  "$python" -c "import cropformer._C as C; assert C.WITH_CUDA, 'built without CUDA kernels'; print('WITH_CUDA', C.WITH_CUDA)"
step resources resources.log 60 "$python" scripts/cuda_resources.py check "$out/build.log" --arch $archs
step parity parity.log "${GPU_SUITE_PARITY_S:-150}" \
  "$python" -m pytest -m "gpu and not bench" -x -q -rs -p no:cacheprovider --junitxml="$out/parity.xml"
step skips skips.log 30 "$python" scripts/check_skips.py "$out/parity.xml" "${GPU_SUITE_ALLOWED_SKIPS:-}"
rm -f "$out/bench_results.jsonl"
step bench bench.log "${GPU_SUITE_BENCH_S:-150}" \
  env CROPFORMER_BENCH_OUT="$out/bench_results.jsonl" "$python" -m pytest -m "gpu and bench" -q -s -p no:cacheprovider
step summary summary.log 30 \
  "$python" scripts/bench_summary.py "$out/bench_results.jsonl" --env "$out/env.txt" --out "$out/summary.md"
echo "== [$(( $(date +%s) - start )) s] GPU suite passed; results in $out/ (summary.md for docs/BENCHMARKS.md)"
