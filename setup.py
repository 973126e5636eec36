"""Install CropFormer and, when it can, build the optional compiled extension `cropformer._C`.

The extension holds the C++ (OpenMP) CPU kernels and, when a CUDA toolkit is present, the CUDA kernels
of `csrc/`. It is optional: a failed or skipped build never fails the install, and every op then runs on
its torch (or Triton) path. Switches (environment variables):

    CROPFORMER_BUILD_EXT=auto|0|1    build the extension: auto (default) = try, 0 = skip, 1 = must build
    CROPFORMER_BUILD_CUDA=auto|0|1   include the CUDA sources: auto = when nvcc is found, 0 = CPU only,
                                     1 = CUDA required (the build fails loudly without it)
    TORCH_CUDA_ARCH_LIST="9.0"       CUDA architectures (default: the visible GPU, else 9.0)
    MAX_JOBS=N                       parallel compile jobs (ninja)

Install: ``pip install --no-build-isolation -e .`` (torch must already be installed; see README).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
import warnings
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


def _extensions():
    build_ext_flag = _flag("CROPFORMER_BUILD_EXT")
    cuda_flag = _flag("CROPFORMER_BUILD_CUDA")
    if build_ext_flag == "0":
        print("setup.py: CROPFORMER_BUILD_EXT=0, skipping the compiled extension", file=sys.stderr)
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
        warnings.warn("torch is not installed: skipping the compiled extension (pip install torch first)")
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = os.environ.get("CUDA_HOME", cpp_extension.CUDA_HOME)
    use_cuda = bool(cu_sources) and cuda_flag != "0" and cuda_home is not None and torch.version.cuda is not None
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
            # torch compiles for the visible GPU; without one (CI, this machine) pick Hopper.
            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        inc, libs = _cuda_runtime_dirs(ROOT / "build")
        include_dirs += inc
        library_dirs += libs
        extra_link += [f"-Wl,-rpath,{d}" for d in libs]
        define_macros.append(("WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "cropformer._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
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
                warnings.warn(
                    f"cropformer._C failed to build ({exc}); installing without it, ops use torch/Triton paths. "
                    "Set CROPFORMER_BUILD_EXT=1 to make this an error."
                )

    print(
        f"setup.py: building cropformer._C with {len(cpp_sources)} C++ and "
        f"{len(cu_sources) if use_cuda else 0} CUDA sources (CUDA {'on' if use_cuda else 'off'})",
        file=sys.stderr,
    )
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="cropformer",
    version="0.1.0",
    description="CropFormer fine-grained entity segmentation in plain PyTorch, with fused kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cropformer", "cropformer.*", "kernels", "kernels.*"]),
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
        "test": ["pytest", "transformers", "faster-coco-eval"],
        "triton": ["triton>=3.6"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
