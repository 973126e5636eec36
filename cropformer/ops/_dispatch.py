"""One backend resolver shared by every op in `cropformer.ops`.

Each op module calls :func:`resolve` with the backends it implements; ``backend="auto"`` picks the
fastest one available for the tensor's device and dtype and logs once per (op, choice, reason) which
one it took and why. Nothing here probes the GPU at import time: availability is checked lazily.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable, Sequence

import torch

logger = logging.getLogger("cropformer.ops")

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")


@functools.lru_cache(maxsize=None)
def compiled_extension():
    """The compiled extension `cropformer._C`, or None when it was not built.

    Only ImportError/OSError are caught (a missing build or a missing CUDA runtime library); any other
    failure is a real bug and propagates. Importing it registers `torch.ops.cropformer_C.*`.
    """
    try:
        return importlib.import_module("cropformer._C")
    except (ImportError, OSError) as exc:
        logger.info("compiled extension cropformer._C unavailable (%s); C++/CUDA backends disabled", exc)
        return None


def has_compiled_op(name: str) -> bool:
    """True when `torch.ops.cropformer_C.<name>` exists (the extension, or a `jit_load`, registered it)."""
    compiled_extension()
    try:
        getattr(torch.ops.cropformer_C, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def has_cuda_kernels() -> bool:
    """True when the compiled kernels include their CUDA sources."""
    ext = compiled_extension()
    return (ext is not None and bool(getattr(ext, "WITH_CUDA", False))) or _jit_cuda


_jit_cuda = False


def jit_load(ops: Sequence[str], cuda: bool = False, verbose: bool = False) -> None:
    """Development aid: compile `csrc/<op>/` for the named ops with torch's JIT loader into a private
    build folder and register them, without `setup.py` (used by tests when CROPFORMER_JIT_OPS is set).
    """
    global _jit_cuda
    from pathlib import Path

    from torch.utils import cpp_extension

    csrc = Path(__file__).resolve().parents[2] / "csrc"
    sources = [str(csrc / "module.cpp")]
    for op in ops:
        sources += sorted(str(p) for p in (csrc / op).glob("*.cpp"))
        if cuda:
            sources += sorted(str(p) for p in (csrc / op).glob("*.cu"))
    name = "cropformer_jit_" + "_".join(sorted(ops)) + ("_cuda" if cuda else "")
    build = Path(os.environ.get("TMPDIR", "/tmp")) / "cropformer_jit" / name
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_include_paths=[str(csrc)],
        extra_cflags=["-O3", "-fopenmp"] + (["-DWITH_CUDA"] if cuda else []),
        extra_cuda_cflags=["-O3", "--use_fast_math", "-DWITH_CUDA"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        verbose=verbose,
    )
    _jit_cuda = _jit_cuda or cuda


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    """Triton kernels run on CPU tensors only under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    if not triton_available():
        return False
    return device.type == "cuda" or triton_interpret()


_logged: set = set()


def _log_once(op: str, choice: str, reason: str) -> None:
    key = (op, choice, reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("%s: backend=%s (%s)", op, choice, reason)


def resolve(
    op: str,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    preference: Sequence[tuple[str, Callable[[torch.device, torch.dtype], bool], str]],
) -> str:
    """Pick a backend.

    Args:
        op: op name, for messages.
        backend: the user's request, one of BACKENDS.
        device, dtype: of the op's main input.
        preference: ``(name, available(device, dtype) -> bool, why)`` in order of preference for
            ``auto``; the torch reference is always the last resort and need not be listed. ``auto``
            never picks "triton" for a non-CUDA tensor (that would be the interpreter).

    Returns the chosen name. An explicit backend that is not available raises a RuntimeError that says
    why, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend != "auto":
        for name, available, _ in preference:
            if name == backend:
                if not available(device, dtype):
                    raise RuntimeError(
                        f"{op}: backend {backend!r} is not available for device={device.type} "
                        f"dtype={dtype} (extension built: {compiled_extension() is not None}, "
                        f"triton: {triton_available()}, TRITON_INTERPRET={triton_interpret()})"
                    )
                return name
        raise RuntimeError(f"{op}: backend {backend!r} is not implemented for this op")
    for name, available, why in preference:
        # Triton on a CPU tensor is its interpreter: for tests, never an automatic choice.
        if name == "triton" and device.type != "cuda":
            continue
        if available(device, dtype):
            _log_once(op, name, why)
            return name
    _log_once(op, "torch", f"no fast path available for device={device.type} dtype={dtype}")
    return "torch"


# Registries each op module fills at import (ops/<op>.py), read by `resolve` and `cropformer info`.
# PREFERENCES: op -> the `preference` list that op passes to `resolve` (fixed per op).
# SELFTESTS: op -> fn(backend, device, dtype) that runs that backend on a small random problem against
#   the float64 torch reference, forward and every gradient, and raises on a mismatch.
PREFERENCES: dict[str, Sequence[tuple[str, Callable[[torch.device, torch.dtype], bool], str]]] = {}
SELFTESTS: dict[str, Callable[[str, torch.device, torch.dtype], None]] = {}


def register_op(op: str, preference, selftest: Callable[[str, torch.device, torch.dtype], None] | None = None) -> None:
    PREFERENCES[op] = preference
    if selftest is not None:
        SELFTESTS[op] = selftest
