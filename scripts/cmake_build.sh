#!/usr/bin/env bash
# Configure and build csrc/ with CMake (CPU kernels), then check from Python that the library loads and
# registers its ops. Usage: scripts/cmake_build.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cmake}
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
extra=()
# A CUDA build of torch makes its CMake config look for the CUDA toolkit (FindCUDA) and for nvrtc even
# when we build CPU kernels only; point it at the toolkit and at the nvrtc of torch's nvidia wheel.
if python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  extra+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc")
  nvrtc=$(python -c 'import glob, sysconfig; print(next(iter(sorted(glob.glob(sysconfig.get_paths()["purelib"] + "/nvidia/cu*/lib/libnvrtc.so.*"))), ""))')
  [ -n "$nvrtc" ] && extra+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi
mkdir -p "$(dirname "$build")"
cmake -S . -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release "${extra[@]}" >"$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "${MAX_JOBS:-2}"
python - "$build" <<'PY'
import sys, pathlib, torch
lib = next(pathlib.Path(sys.argv[1]).glob("libcropformer_ops*.so"))
torch.ops.load_library(str(lib))
import re
sources = pathlib.Path("csrc").rglob("*.cpp")
names = sorted({m for p in sources for m in re.findall(r'm\.def\(\s*"(\w+)\(', p.read_text())})
missing = [n for n in names if not hasattr(torch.ops.cropformer_C, n)]
assert names and not missing, f"ops not registered by {lib}: {missing}"
print(f"CMake library {lib} loads and registers {names}")
PY
