"""`cropformer.allocator.tune_cpu_allocator`: freed tensors' memory is reused (no fresh page faults), and the
user's own allocator choice is left alone."""
import json
import os
import platform
import subprocess
import sys

import pytest

from cropformer import allocator
from tests.conftest import REPO

# Allocate and free a 64 MiB tensor (above glibc's largest dynamic mmap threshold, 32 MiB), then touch a 48 MiB
# one: its page faults tell whether the freed memory was kept for reuse. (The second tensor is smaller because
# torch asks for 64-byte aligned blocks: glibc 2.36 cannot fit an aligned request into a hole of exactly the
# freed size, so a same-size pair grows the heap once more; the workloads mix sizes, see docs/NOTES.md.)
_PROBE = """
import json, resource, sys
import torch
from cropformer.allocator import allocator_state
if sys.argv[1] == "segmenter":
    from cropformer.config import load_config
    from cropformer.inference import Segmenter
    from cropformer.modeling.build import build_model
    cfg = load_config("tiny")
    Segmenter(build_model(cfg.model), cfg)
else:
    from cropformer.allocator import tune_cpu_allocator
    tune_cpu_allocator()
def touch(mib):
    x = torch.empty(mib << 18)
    x.fill_(1.0)
    return x
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
del_me = touch(64); del del_me
f0 = faults()
y = touch(48)
hole = faults() - f0
# A pass that frees more than 1 GiB at once (the five-view forward frees 1.2-1.5 GiB): a trim threshold,
# even a 1 GiB one, hands the heap's free top back to the kernel and the next pass faults it in again.
big = [touch(300) for _ in range(4)]
del big
f0 = faults()
again = [touch(280) for _ in range(4)]
top = faults() - f0
del again
from cropformer.allocator import release_cpu_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
before = rss()
released = release_cpu_memory()
print(json.dumps({"state": allocator_state(), "faults": hole, "top_faults": top, "released": released,
                  "rss_before_release_mib": before, "rss_after_release_mib": rss()}))
"""
PAGES = (48 << 20) // 4096
TOP_PAGES = (4 * 280 << 20) // 4096

glibc_linux = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="the tuning applies to glibc's malloc on Linux only")


def _probe(how: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MALLOC_", "CROPFORMER_ALLOCATOR")) and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE, how], env=clean | env, cwd=REPO, capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@glibc_linux
@pytest.mark.parametrize("how", ["call", "segmenter"])
def test_tuned_allocator_reuses_freed_memory(how):
    r = _probe(how)
    assert r["state"].startswith("tuned"), r
    assert r["faults"] < PAGES // 8, f"{r['faults']} page faults touching 48 MiB after freeing 64 MiB ({PAGES} pages): memory not reused"
    assert r["top_faults"] < TOP_PAGES // 8, (
        f"{r['top_faults']} page faults touching 1.1 GiB after freeing 1.2 GiB ({TOP_PAGES} pages): the heap was trimmed")
    # what the tuning keeps, `release_cpu_memory` hands back: the 4 x 280 MiB freed above
    assert r["released"] and r["rss_before_release_mib"] - r["rss_after_release_mib"] > 900, r


@glibc_linux
def test_opt_out_leaves_malloc_alone():
    r = _probe("call", CROPFORMER_ALLOCATOR="system")
    assert r["state"] == "unchanged: CROPFORMER_ALLOCATOR=system"
    if not _thp_always():  # with 2 MiB pages a fresh mapping takes 24 faults, not 12288
        assert r["faults"] > PAGES // 2, r
        assert r["top_faults"] > TOP_PAGES // 2, r


@pytest.mark.parametrize("env, why", [
    ({"CROPFORMER_ALLOCATOR": "SYSTEM"}, "CROPFORMER_ALLOCATOR=system"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}, "GLIBC_TUNABLES sets glibc.malloc"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
    ({"LD_PRELOAD": "/opt/libtcmalloc_minimal.so"}, "tcmalloc is preloaded"),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, None),
    ({}, None),
])
def test_user_choice_is_respected(monkeypatch, env, why):
    for name in ("CROPFORMER_ALLOCATOR", "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert allocator._user_choice() == why
