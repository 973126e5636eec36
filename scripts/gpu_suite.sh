#!/usr/bin/env bash
# The whole GPU suite in one command, for a lent GPU machine (torch 2.11+ preinstalled, no network):
# builds the extension with its CUDA kernels for the visible GPU, runs every GPU parity test and the
# benchmarks, and leaves the results in $OUT (or ./gpu_results) for docs/BENCHMARKS.md:
#   env.txt           device, driver, torch/triton versions, date
#   build.log         the extension build
#   gpu_tests.log     pytest -m gpu (parity on the GPU)  + junit xml
#   bench.log         pytest -m bench (all benchmarks)   + bench_results.jsonl (one JSON record each)
# Usage: bash scripts/gpu_suite.sh            (on the device machine, in the repository root)
# (Test modules default TRITON_INTERPRET=1 for CPU runs; here it is 0 so Triton compiles for the GPU.)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
# No network there: nothing is installed, the extension is built in place against the preinstalled torch.
CROPFORMER_BUILD_EXT=1 CROPFORMER_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
  python setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; echo "BUILD FAILED"; }
python -c "import cropformer._C as C; print('extension WITH_CUDA =', C.WITH_CUDA)" 2>&1 | tee -a "$out/env.txt"
TRITON_INTERPRET=0 python -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" | tail -30
TRITON_INTERPRET=0 CROPFORMER_BENCH_OUT="$out/bench_results.jsonl" python -m pytest -m bench -q -s -p no:cacheprovider 2>&1 | tee "$out/bench.log" | tail -60
echo "results in $out/"
