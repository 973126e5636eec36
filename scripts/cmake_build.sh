#!/usr/bin/env bash
# Configure and build csrc/ with CMake (CPU kernels), then check from Python that the library loads and
# registers its ops. Usage: scripts/cmake_build.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cmake}
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >"$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "${MAX_JOBS:-2}"
python - "$build" <<'PY'
import sys, pathlib, torch
lib = next(pathlib.Path(sys.argv[1]).glob("libcropformer_ops*.so"))
torch.ops.load_library(str(lib))
ops = [n for n in dir(torch.ops.cropformer_C) if not n.startswith("_")]
print(f"CMake library {lib} loads; ops: {ops}")
PY
