#!/usr/bin/env bash
# CI: every CUDA kernel of csrc/ compiled for sm_80 and sm_90 with -Xptxas -v, and each kernel's registers,
# spills and static + dynamic shared memory checked against its launch configuration
# (scripts/cuda_resources.py; exit 1 on a violation, an unlisted kernel, or a kernel without a report).
# Usage: bash scripts/ci_cuda_check.sh [BUILD_LOG]
#   BUILD_LOG  output of an extension build made with CROPFORMER_PTXAS_VERBOSE=1 for sm_80 and sm_90 (pip
#              shows the compiler's output only with -v): its ptxas reports are checked.
#   no file    device-only nvcc of each .cu file for both architectures (no host compile of torch's
#              headers: ~30 CPU-seconds), output kept in build/ptxas.log, then the check.
# CUDA_CHECK_ARCHS="80 90" chooses the architectures; PYTHON the interpreter (it needs torch for `compile`).
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a archs <<< "${CUDA_CHECK_ARCHS:-80 90}"
python=${PYTHON:-python}
if [ $# -ge 1 ]; then
  "$python" scripts/cuda_resources.py check "$1" --arch "${archs[@]}"
else
  mkdir -p build
  "$python" scripts/cuda_resources.py compile --arch "${archs[@]}" --log build/ptxas.log
fi
