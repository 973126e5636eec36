"""Keep freed CPU memory in the process instead of handing it back to the kernel at every free.

torch's CPU tensors come from malloc. glibc serves a block above its mmap threshold (at most 32 MiB,
raised on the fly) with a fresh mmap and unmaps it on free, and trims the heap's free top beyond
128 KiB; the next tensor of that size then touches new pages, one page fault per 4 KiB. A forward pass
makes many such tensors (a 256-channel map at 200 x 272 is 53 MiB): one Swin-T view at 800 x 1088 took
about 590,000 page faults (2.3 GiB of fresh pages) per forward, and on a virtual machine a fault costs
microseconds. `tune_cpu_allocator` raises the mmap threshold to 1 GiB and turns trimming off: freed
blocks are reused, the faults drop to ~0 after the first pass, the same forward ran 1.45x faster and a
demo training iteration 1.1x (docs/BENCHMARKS.md, "CPU allocator").

Trimming is off, not merely raised: with a 1 GiB trim threshold the five-view (full + 4 crops) forward
at 800 x 1088 freed 1.2-1.5 GiB at once, glibc gave it back at the end of every forward and the next one
took 240,000-330,000 faults afresh. The cost: the process keeps the heap of its largest pass until it
exits or calls `release_cpu_memory()` (after each five-view forward 2.75-2.89 GiB resident, where trimming
left 1.45-1.70 GiB whenever it happened; the peak is the same). A long-lived process done with the network
can call it.

`tune_cpu_allocator` is called by every command-line tool, by `Segmenter` and by `engine.train` on CPU.
It changes nothing where the user chose an allocator: `CROPFORMER_ALLOCATOR=system`, any
`MALLOC_*_` / `GLIBC_TUNABLES=glibc.malloc.*` setting, or jemalloc / tcmalloc / mimalloc in LD_PRELOAD;
nor on a C library other than glibc (macOS, Windows, musl). It only sets two malloc parameters, so it is
safe at any time, before or after torch is imported.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

THRESHOLD_BYTES = 1 << 30  # mmap threshold: larger blocks still get (and return) their own mapping
_NEVER_TRIM = -1  # mallopt(M_TRIM_THRESHOLD, -1): "disables trimming completely" (mallopt(3))
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: str | None = None  # what the first call did, reported by `cropformer info`


def _user_choice() -> str | None:
    """Why the allocator is the user's to set, or None."""
    if os.environ.get("CROPFORMER_ALLOCATOR", "").lower() == "system":
        return "CROPFORMER_ALLOCATOR=system"
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        if name in os.environ:
            return f"{name} is set"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"{name} is preloaded"
    return None


def _not_glibc() -> str | None:
    """Why glibc's malloc is not the one in use (not Linux, another C library), or None."""
    if platform.system() != "Linux":
        return f"not Linux ({platform.system()})"
    if platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    return None


def tune_cpu_allocator() -> str:
    """Raise glibc's mmap threshold to `THRESHOLD_BYTES` and turn heap trimming off, once per process.

    Returns (and logs once) what was done: "tuned: ..." or "unchanged: <why>".
    """
    global _state
    if _state is not None:
        return _state
    why = _user_choice() or _not_glibc()
    if why is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            ok = mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
        except (OSError, AttributeError):
            ok = False
        why = None if ok else "mallopt refused the thresholds"
    if why is None:
        _state = (f"tuned: glibc malloc reuses freed blocks up to {THRESHOLD_BYTES >> 30} GiB and keeps its heap "
                  "(no trimming) instead of page-faulting fresh memory; CROPFORMER_ALLOCATOR=system leaves it alone")
    else:
        _state = f"unchanged: {why}"
    logger.info("CPU allocator %s", _state)
    return _state


def allocator_state() -> str:
    """What `tune_cpu_allocator` did in this process ("not called" before it runs)."""
    return _state or "not called"


def release_cpu_memory() -> bool:
    """Give the heap's free memory back to the kernel now (glibc `malloc_trim(0)`); what the tuning keeps
    for reuse. For long-lived processes done with the network. Returns whether memory was released
    (False off glibc)."""
    if _not_glibc():
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
