"""One backend resolver shared by every op in `cropformer.ops`.

Each op module calls :func:`resolve` with the backends it implements; ``backend="auto"`` picks the
fastest one available for the tensor's device and dtype and logs once per (op, choice, reason) which
one it took and why. Nothing here probes the GPU at import time: availability is checked lazily.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

logger = logging.getLogger("cropformer.ops")

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")


@functools.lru_cache(maxsize=None)
def _load_extension():
    """(module or None, why not): import `cropformer._C` once and say what is wrong with it.

    Not built is normal (INFO); a build that fails to import or is older than its sources is a WARNING:
    it silently costs every fast path, or runs kernels that no longer match the code. Only ImportError /
    OSError are caught (a broken build or a missing CUDA runtime library); anything else is our bug.
    """
    if importlib.util.find_spec("cropformer._C") is None:
        why = "not built (no compiled cropformer/_C*.so; see the README's Kernels section to build it)"
        logger.info("cropformer._C %s; C++/CUDA backends disabled", why)
        return None, why
    try:
        module = importlib.import_module("cropformer._C")
    except (ImportError, OSError) as exc:
        why = f"failed to import ({exc})"
        logger.warning("cropformer._C %s; C++/CUDA backends disabled, ops use their torch/Triton paths. "
                       "Rebuild it against this torch: pip install --no-build-isolation -e .", why)
        return None, why
    newer = _newer_sources(module.__file__)
    if newer:
        logger.warning("cropformer._C is older than its source %s: rebuild it (pip install --no-build-isolation "
                       "-e .); until then `auto` self-verifies the old kernels before using them", newer)
    return module, None


def _newer_sources(so_path: str) -> str | None:
    """In a source checkout, the first csrc/ file modified after the extension was built, else None."""
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    if not csrc.is_dir():  # an installed package: no sources to compare with
        return None
    built = os.stat(so_path).st_mtime
    for f in sorted(csrc.rglob("*")):
        if f.suffix in (".cpp", ".cu", ".h") and f.stat().st_mtime > built:
            return str(f.relative_to(csrc.parent))
    return None


def compiled_extension():
    """The compiled extension `cropformer._C`, or None when it was not built or does not import.

    Importing it registers `torch.ops.cropformer_C.*`.
    """
    return _load_extension()[0]


def extension_problem() -> str | None:
    """Why `cropformer._C` is not loaded ("not built ...", "failed to import (...)"), None when it is."""
    return _load_extension()[1]


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
    from torch.utils import cpp_extension

    csrc = Path(__file__).resolve().parents[2] / "csrc"
    sources = [str(csrc / "module.cpp")] + (sorted(str(p) for p in csrc.glob("*.cu")) if cuda else [])
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


def cuda_device_guard(device: torch.device):
    """Context that makes `device` current for a Triton launch (Triton launches on the current device,
    not the tensors'); a no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cuda_build_archs() -> list[int] | None:
    """Compute capabilities (x10: 80 = sm_80) the extension's CUDA code was compiled for, None if unknown."""
    archs = getattr(compiled_extension(), "CUDA_ARCHS", "")
    return sorted(int(a) // 10 for a in archs.split(",") if a.strip().isdigit()) or None


def cuda_arch_problem(device: torch.device) -> str | None:
    """Why the compiled CUDA kernels cannot run on `device`'s architecture, or None when they may.

    Only the certain case is decided here: every architecture in the build is newer than the device
    (neither its machine code nor its PTX can run there). Anything subtler (machine code for another
    minor version, PTX to JIT) is left to the self-test, which sees the "no kernel image" error itself.
    """
    archs = cuda_build_archs()
    if device.type != "cuda" or archs is None:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    cap = 10 * major + minor
    if all(a > cap for a in archs):
        return (f"the GPU's architecture sm_{cap} is not in the build (built for "
                f"{', '.join(f'sm_{a}' for a in archs)}; rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor})")
    return None


_logged: set = set()


def _log_once(op: str, choice: str, reason: str, level: int = logging.INFO) -> None:
    key = (op, choice, reason)
    if key not in _logged:
        _logged.add(key)
        logger.log(level, "%s: backend=%s (%s)", op, choice, reason)


Preference = Sequence[tuple[str, Callable[[torch.device, torch.dtype], bool], str]]


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why `backend` cannot run here, in words: the first missing prerequisite (for messages)."""
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs CPU tensors only (got {device.type})"
        if compiled_extension() is None:
            return f"cropformer._C is {extension_problem()}"
    elif backend == "cuda":
        if device.type != "cuda":
            return f"it runs CUDA tensors only (got {device.type})"
        if compiled_extension() is None and not _jit_cuda:
            return f"cropformer._C is {extension_problem()}"
        if not has_cuda_kernels():
            return ("cropformer._C was built without CUDA kernels (rebuild on a machine with nvcc: "
                    "CROPFORMER_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
        problem = cuda_arch_problem(device)
        if problem:
            return problem
    elif backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not triton_interpret():
            return "Triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)"
    return f"it does not support dtype {dtype} here (or its kernel is missing from cropformer._C)"


def _auto_may_try(name: str, device: torch.device) -> bool:
    # Triton on a CPU tensor is its interpreter: for tests, never an automatic choice.
    return not (name == "triton" and device.type != "cuda")


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype, preference: Preference) -> str:
    """Pick a backend.

    Args:
        op: op name, for messages and the self-test registry.
        backend: the user's request, one of BACKENDS.
        device, dtype: of the op's main input.
        preference: ``(name, available(device, dtype) -> bool, why)`` in order of preference for
            ``auto``; the torch reference is always the last resort and need not be listed. ``auto``
            never picks "triton" for a non-CUDA tensor (that would be the interpreter), never the CUDA
            kernels on a GPU whose architecture the build lacks, and never a fast path that failed its
            self-test (see `verify`).

    Returns the chosen name. An explicit backend that is not available raises a RuntimeError that says
    what is missing, never a silent fallback; an explicit backend is not self-tested.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend != "auto":
        for name, available, _ in preference:
            if name == backend:
                if not available(device, dtype) or (name == "cuda" and cuda_arch_problem(device)):
                    raise RuntimeError(f"{op}: backend {backend!r} is not available for device={device.type} "
                                       f"dtype={dtype}: {unavailable_reason(name, device, dtype)}")
                return name
        raise RuntimeError(f"{op}: backend {backend!r} is not implemented for this op")
    for name, available, why in preference:
        if not _auto_may_try(name, device) or not available(device, dtype):
            continue
        problem = cuda_arch_problem(device) if name == "cuda" else None
        if problem:
            _log_once(op, "not cuda", f"{problem}; falling back to the next backend", logging.WARNING)
            continue
        if verify(op, name, device, dtype) is None:
            _log_once(op, name, why)
            return name
    _log_once(op, "torch", f"no fast path available for device={device.type} dtype={dtype}")
    return "torch"


# ----------------------------------------------------------------------------------------------------
# Self-verification of fast paths: run once per (op, backend, device, dtype, build), remembered.
# ----------------------------------------------------------------------------------------------------

# Registries each op module fills at import (ops/<op>.py), read by `resolve` and `cropformer info`.
# PREFERENCES: op -> the `preference` list that op passes to `resolve` (fixed per op).
# SELFTESTS: op -> fn(backend, device, dtype) that runs that backend on a small random problem against
#   the float64 torch reference, forward and every gradient, and raises on a mismatch.
PREFERENCES: dict[str, Preference] = {}
SELFTESTS: dict[str, Callable[[str, torch.device, torch.dtype], None]] = {}


def register_op(op: str, preference: Preference,
                selftest: Callable[[str, torch.device, torch.dtype], None] | None = None) -> None:
    """Declare an op's `auto` preference and its self-test.

    The self-test must draw its inputs from its own `torch.Generator` (never the global RNG: training
    stays reproducible), call the op with the explicit backend, and raise (any exception) on a mismatch
    against the float64 reference in the forward or any gradient, beyond the op's tolerance for dtype.
    """
    PREFERENCES[op] = preference
    if selftest is not None:
        SELFTESTS[op] = selftest


def check_selftest(op: str, names: Sequence[str], got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                   tol: float) -> None:
    """Raise when any of `got` (a fast path's output and gradients) differs from the float64 `expected`
    by more than tol x max(1, max |expected|), or is not finite where expected is; for self-tests."""
    for name, g, e in zip(names, got, expected):
        if tuple(g.shape) != tuple(e.shape):
            raise AssertionError(f"{op} self-test: {name} has shape {list(g.shape)}, expected {list(e.shape)}")
        err = (g.detach().double().cpu() - e.detach().double().cpu()).abs().max().item() if e.numel() else 0.0
        bound = tol * max(1.0, e.abs().max().item() if e.numel() else 0.0)
        if not err <= bound:  # NaN fails too
            raise AssertionError(f"{op} self-test: {name} is off by {err:.3g} (tolerance {bound:.3g})")


class VerificationError(RuntimeError):
    """A fast path failed its self-test under CROPFORMER_VERIFY=strict."""


VERIFY_MODES = ("on", "off", "strict")
_CACHE_FILE = "verified-v1.json"
# (op, backend, device, dtype) -> None (passed) or the error text, for this process.
_verdicts: dict[tuple, str | None] = {}


def verify_mode() -> str:
    mode = os.environ.get("CROPFORMER_VERIFY", "on").strip().lower() or "on"
    if mode not in VERIFY_MODES:
        raise ValueError(f"CROPFORMER_VERIFY={mode!r}: expected one of {', '.join(VERIFY_MODES)}")
    return mode


def cache_dir() -> Path:
    """$CROPFORMER_CACHE_DIR, else $XDG_CACHE_HOME/cropformer, else ~/.cache/cropformer."""
    if os.environ.get("CROPFORMER_CACHE_DIR"):
        return Path(os.environ["CROPFORMER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cropformer"


def _device_name(device: torch.device) -> str:
    """What the verdict depends on for this device: the GPU model and driver, or the CPU model."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm_{major}{minor} driver {_cuda_driver()}"
    return f"{device.type} {_cpu_model()}"


@functools.lru_cache(maxsize=None)
def _cuda_driver() -> str:
    import ctypes

    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return str(version.value)
    except (OSError, AttributeError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def build_identity(backend: str) -> str | None:
    """What the fast path's code is: the extension file (size, mtime) for "cpu" / "cuda", the Triton
    version and a hash of the kernel sources for "triton"; None without an extension (a JIT build), which
    keeps the verdict out of the disk cache."""
    if backend == "triton":
        import hashlib

        import triton

        digest = hashlib.sha1()
        for f in sorted((Path(__file__).resolve().parents[1] / "kernels").glob("*.py")):
            digest.update(f.read_bytes())
        return f"triton {triton.__version__} kernels {digest.hexdigest()[:16]}"
    ext = compiled_extension()
    if ext is None:  # a JIT build (tests), or a path that needs no build: re-checked in each process
        return None
    stat = os.stat(ext.__file__)
    return f"{Path(ext.__file__).name} {stat.st_size} {stat.st_mtime_ns}"


def _disk_key(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    build = build_identity(backend)
    if build is None:
        return None
    return " | ".join((op, backend, str(dtype), _device_name(device), f"torch {torch.__version__}", build))


def _read_cache() -> dict:
    try:
        data = json.loads((cache_dir() / _CACHE_FILE).read_text())
    except (OSError, ValueError):  # missing, unreadable or corrupt: start afresh
        return {}
    return data if isinstance(data, dict) else {}


def _remember(key: str) -> None:
    """Record a passed self-test on disk (atomically; merged with what other processes wrote)."""
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = "passed"
        tmp = folder / f".{_CACHE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, folder / _CACHE_FILE)
    except OSError as exc:  # a read-only home costs a re-check in the next process, nothing more
        logger.info("could not record the self-test verdict in %s (%s)", cache_dir(), exc)


def verified_on_disk(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    key = _disk_key(op, backend, device, dtype)
    return key is not None and _read_cache().get(key) == "passed"


def _describe_failure(exc: BaseException, device: torch.device) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if "no kernel image" in str(exc):
        major, minor = torch.cuda.get_device_capability(device)
        archs = cuda_build_archs()
        built = ", ".join(f"sm_{a}" for a in archs) if archs else "unknown architectures"
        text = f"the build has no code for this GPU's architecture sm_{major}{minor} (built for {built}): {text}"
    return text


def run_selftest(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run `op`'s self-test for `backend` now: None when it passes, else the error in one line."""
    from torch.utils._python_dispatch import _disable_current_modes

    test = SELFTESTS[op]
    start = time.perf_counter()
    # On real tensors even when the op is first called while tracing (FakeTensorMode of torch.export,
    # make_fx); with autograd even inside no_grad / inference_mode; without moving the user's RNG.
    with _disable_current_modes(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.inference_mode(False), torch.enable_grad():
        try:
            test(backend, device, dtype)
        except Exception as exc:  # any failure of the fast path is a verdict, not a crash
            return _describe_failure(exc, device)
    logger.debug("%s: %s self-test on %s %s passed in %.1f ms", op, backend, device, dtype,
                 1e3 * (time.perf_counter() - start))
    return None


def verify(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Self-verify `backend` of `op` for (device, dtype) once; None when it may be used, else the error.

    CROPFORMER_VERIFY: "on" (default) runs the op's self-test the first time and falls back with one
    warning on failure; "strict" raises VerificationError instead; "off" trusts every fast path. A pass
    is remembered for the process and on disk (cache_dir(), keyed by op, backend, dtype, device model
    and driver, torch version and build); a failure is re-checked in each new process.
    """
    mode = verify_mode()
    if mode == "off" or op not in SELFTESTS:
        return None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (op, backend, str(device), dtype)
    if key not in _verdicts:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # no test can run inside a CUDA graph capture: warm up (verify) before capturing
        disk_key = _disk_key(op, backend, device, dtype)
        if disk_key is not None and _read_cache().get(disk_key) == "passed":
            error = None
        else:
            error = run_selftest(op, backend, device, dtype)
            if error is None and disk_key is not None:
                _remember(disk_key)
        _verdicts[key] = error
        if error is not None and mode != "strict":
            logger.warning("%s: the %s backend failed its self-test on %s (%s, %s) and is not used; falling "
                           "back to the next backend. Error: %s", op, backend, device, _device_name(device),
                           dtype, error)
    error = _verdicts[key]
    if error is not None and mode == "strict":
        raise VerificationError(f"{op}: the {backend} backend failed its self-test on {device} "
                                f"({_device_name(device)}, {dtype}): {error}")
    return error


def explain(op: str, device: torch.device, dtype: torch.dtype, run_tests: bool = False) -> dict:
    """What `auto` picks for `op` on (device, dtype) and why, for `cropformer info`.

    Returns {"backend", "reason", "candidates": [{"backend", "status"}]}; self-tests run only when
    run_tests (then exactly as `resolve` would run them), otherwise a fast path is reported with
    whether a self-test verdict is already on disk.
    """
    candidates, choice, reason = [], None, f"no fast path available for device={device.type} dtype={dtype}"
    for name, available, why in PREFERENCES[op]:
        if not _auto_may_try(name, device):
            status = "skipped: auto never picks the Triton interpreter"
        elif not available(device, dtype) or (name == "cuda" and cuda_arch_problem(device)):
            status = f"unavailable: {unavailable_reason(name, device, dtype)}"
        elif choice is not None:
            status = "available"
        elif op not in SELFTESTS or verify_mode() == "off":
            status = "picked (no self-test)" if op not in SELFTESTS else "picked (CROPFORMER_VERIFY=off)"
        elif run_tests:
            try:
                error = verify(op, name, device, dtype)
            except VerificationError as exc:  # strict mode: reported here like any failure
                error = str(exc)
            status = "picked (self-test passed)" if error is None else f"failed self-test: {error}"
        else:
            status = ("picked (self-test passed earlier, cached on disk)" if verified_on_disk(op, name, device, dtype)
                      else "picked (self-test runs at first use)")
        if choice is None and status.startswith("picked"):
            choice, reason = name, why
        candidates.append({"backend": name, "status": status})
    return {"backend": choice or "torch", "reason": reason, "candidates": candidates}
