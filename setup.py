"""Install CropFormer and, when it can, build the optional compiled extension `cropformer._C`.

The extension holds the C++ (OpenMP) CPU kernels and, when a CUDA toolkit is present, the CUDA kernels
of `csrc/`. It is optional: a failed or skipped build never fails the install, and every op then runs on
its torch (or Triton) path. Switches (environment variables):

    CROPFORMER_BUILD_EXT=auto|0|1    build the extension: auto (default) = try, 0 = skip, 1 = must build
    CROPFORMER_BUILD_CUDA=auto|0|1   include the CUDA sources: auto = only when they can be used (nvcc
                                     found and a GPU visible, or TORCH_CUDA_ARCH_LIST set), 0 = CPU only,
                                     1 = CUDA required (the build fails loudly without it)
    TORCH_CUDA_ARCH_LIST="8.0;9.0"   CUDA architectures (default: the visible GPU, else DEFAULT_ARCHS)
    MAX_JOBS=N                       parallel compile jobs (ninja)
    CROPFORMER_PTXAS_VERBOSE=1       print each CUDA kernel's registers, spills and shared memory
                                     (-Xptxas -v; scripts/cuda_resources.py checks them)
    CROPFORMER_NVCC_FLAGS="..."      extra nvcc flags (split on spaces)

Install: ``pip install --no-build-isolation -e .`` (torch must already be installed; see README).
pyproject.toml declares the PEP 517/660 backend; with ``--no-build-isolation`` the build sees the torch
you installed, which the extension must be compiled against.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"setup.py: {name} must be auto, 0 or 1 (got {value!r})")
    return value


def _find_cuda_home() -> str | None:
    """CUDA_HOME from the environment, else the toolkit folder that holds nvcc and cuda_runtime.h.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script in
    /usr/local/bin; look for the headers instead.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if (Path(c) / "include" / "cuda_runtime.h").exists() and (Path(c) / "bin" / "nvcc").exists():
            return c
    return None


def _cuda_runtime_dirs(build_dir: Path) -> tuple[list[str], list[str]]:
    """Include and library folders of the CUDA runtime that torch's wheel ships (nvidia/cu13).

    The wheel has libcudart.so.13 but no unversioned libcudart.so for the linker: a link to it in the
    build folder is enough. Returns ([include dirs], [library dirs]); empty when no such wheel.
    """
    purelib = Path(sysconfig.get_paths()["purelib"])
    for wheel in sorted(purelib.glob("nvidia/cu*")):
        lib, inc = wheel / "lib", wheel / "include"
        versioned = sorted(lib.glob("libcudart.so.*"))
        if not versioned:
            continue
        link_dir = build_dir / "cudart_link"
        link_dir.mkdir(parents=True, exist_ok=True)
        link = link_dir / "libcudart.so"
        if not link.exists():
            link.symlink_to(versioned[0])
        return [str(inc)] if inc.is_dir() else [], [str(link_dir), str(lib)]
    return [], []


# Without a visible GPU (a build machine, CI): the common datacenter and desktop architectures, with PTX
# for the newest so later GPUs can JIT it. CUDA 13 no longer targets anything older than Turing (7.5).
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# nvcc flags of the CUDA sources; scripts/cuda_resources.py reads this list (keep it a literal).
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


def _say(message: str) -> None:
    """One line on stderr; pip shows it with -v, and on failure."""
    print(f"setup.py: {message}", file=sys.stderr)


def _extensions():
    build_ext_flag = _flag("CROPFORMER_BUILD_EXT")
    cuda_flag = _flag("CROPFORMER_BUILD_CUDA")
    if build_ext_flag == "0":
        _say("CROPFORMER_BUILD_EXT=0, skipping the compiled extension; ops run on their torch/Triton paths")
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if len(cpp_sources) <= 1:  # only the module stub: nothing to build
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        if build_ext_flag == "1":
            raise SystemExit("setup.py: CROPFORMER_BUILD_EXT=1 but torch is not importable; install torch first")
        _say("torch is not importable here: skipping the compiled extension (install torch first, then "
             "pip install --no-build-isolation ...); `cropformer info` shows what is missing")
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = os.environ.get("CUDA_HOME", cpp_extension.CUDA_HOME)
    can_cuda = bool(cu_sources) and cuda_home is not None and torch.version.cuda is not None
    # auto: compile CUDA only where it can run (a visible GPU) or where the user names architectures;
    # on a CPU-only machine with nvcc it would only add build time for kernels that cannot run there.
    wanted = cuda_flag == "1" or (cuda_flag == "auto" and (bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
                                                           or torch.cuda.is_available()))
    use_cuda = can_cuda and wanted
    if cuda_flag == "auto" and can_cuda and not wanted:
        _say("no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the C++ CPU kernels only "
             "(CROPFORMER_BUILD_CUDA=1 compiles the CUDA kernels too)")
    if cuda_flag == "1" and not use_cuda:
        raise SystemExit(
            f"setup.py: CROPFORMER_BUILD_CUDA=1 but no CUDA build is possible "
            f"(nvcc toolkit: {cuda_home}, torch CUDA: {torch.version.cuda}, .cu sources: {len(cu_sources)})"
        )
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # No -std flag: torch's build helpers pick the standard its headers need (C++17 up to 2.13, C++20 on 2.14).
    cxx_flags = ["-O3", *openmp]
    define_macros = []
    include_dirs = [str(ROOT / "csrc")]
    library_dirs: list[str] = []
    extra_link = [*openmp]
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # torch compiles for the visible GPU; without one, the common architectures.
            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        inc, libs = _cuda_runtime_dirs(ROOT / "build")
        include_dirs += inc
        library_dirs += libs
        extra_link += [f"-Wl,-rpath,{d}" for d in libs]
        define_macros.append(("WITH_CUDA", None))
        nvcc_flags = [*NVCC_FLAGS, *os.environ.get("CROPFORMER_NVCC_FLAGS", "").split()]
        if os.environ.get("CROPFORMER_PTXAS_VERBOSE") == "1":
            nvcc_flags += ["-Xptxas", "-v"]
        ext = cpp_extension.CUDAExtension(
            "cropformer._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": nvcc_flags,
            },
            extra_link_args=extra_link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "cropformer._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Build the extension; on failure warn and install without it (unless forced)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler errors surface as several distutils/ninja types
                if build_ext_flag == "1" or cuda_flag == "1":
                    raise
                _say(f"cropformer._C failed to build ({exc}); installing without it, ops use torch/Triton paths. "
                     "Set CROPFORMER_BUILD_EXT=1 to make this an error.")

    _say(f"building cropformer._C with {len(cpp_sources)} C++ and {len(cu_sources) if use_cuda else 0} CUDA sources "
         f"(CUDA {'on, archs ' + os.environ.get('TORCH_CUDA_ARCH_LIST', '') if use_cuda else 'off'})")
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="cropformer",
    version="0.1.0",
    description="CropFormer fine-grained entity segmentation in plain PyTorch, with fused kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # cropformer/kernels and cropformer/configs are links to the repo's kernels/ and configs/: the Triton
    # kernels install as `cropformer.kernels` (nothing else at top level), the configs as package data.
    packages=find_packages(include=["cropformer", "cropformer.*"]),
    package_data={"cropformer": ["configs/*.json"]},
    entry_points={"console_scripts": ["cropformer = cropformer.cli:main"]},
    install_requires=[
        "torch>=2.11,<2.15",
        "numpy",
        "scipy",
        "pycocotools",
        "opencv-python-headless",
        "safetensors",
        "pillow",
    ],
    extras_require={
        "build": ["ninja", "pybind11"],
        # everything the CPU test suite exercises (HF parity, faster-coco-eval, ONNX export in onnxruntime)
        "test": ["pytest", "transformers", "faster-coco-eval", "onnx", "onnxscript", "onnxruntime"],
        "triton": ["triton>=3.6"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
