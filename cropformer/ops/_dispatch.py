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
    """True when `torch.ops.cropformer_C.<name>` exists (extension built with that op)."""
    if compiled_extension() is None:
        return False
    return hasattr(torch.ops.cropformer_C, name)


def has_cuda_kernels() -> bool:
    """True when the compiled extension was built with its CUDA sources."""
    ext = compiled_extension()
    return ext is not None and bool(getattr(ext, "WITH_CUDA", False))


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
            ``auto``; the torch reference is always the last resort and need not be listed.

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
        if available(device, dtype):
            _log_once(op, name, why)
            return name
    _log_once(op, "torch", f"no fast path available for device={device.type} dtype={dtype}")
    return "torch"
