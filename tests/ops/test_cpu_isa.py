"""The C++ CPU kernels are compiled twice on x86-64 (baseline and AVX2 + FMA, `run_best_cpu` in
csrc/common.h) and pick one at run time. On an AVX2 machine the parity tests only ever see the AVX2
code, so these run the baseline code too (`CROPFORMER_CPU_ISA=baseline`, read once per process, hence
subprocesses): its parity tests against the float64 references, and the point-mask sampling bit for bit
equal between the two (explicit fma() and no a * b + c: the samples must not depend on the CPU).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cropformer.ops._dispatch import has_compiled_op
from tests.conftest import REPO


def _avx2_or_skip():
    if not (has_compiled_op("point_mask_loss_fwd") and has_compiled_op("ms_deform_attn_forward")):
        pytest.skip("C++ ops not built")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU runs the baseline code already: nothing to compare")


def _env(isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("CROPFORMER_CPU_ISA", None)
    if isa:
        env["CROPFORMER_CPU_ISA"] = isa
    return env


def test_baseline_code_passes_the_cpu_parity_tests():
    _avx2_or_skip()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu and not triton",
           "tests/ops/test_point_mask.py", "tests/ops/test_ms_deform_attn.py"]
    run = subprocess.run(cmd, cwd=REPO, env=_env("baseline"), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]


_SAMPLES = """
import sys, torch
from cropformer.ops._dispatch import compiled_extension
assert compiled_extension() is not None  # importing it registers the ops
ops = torch.ops.cropformer_C
g = torch.Generator().manual_seed(0)
out = {}
for dtype in (torch.float32, torch.float64):
    logits = torch.randn(7, 37, 53, generator=g, dtype=dtype) * 4
    masks = torch.rand(5, 2, 91, 67, generator=g) > 0.5
    pts = torch.rand(1000, 2, generator=g, dtype=dtype) * 1.2 - 0.1  # some outside the maps
    rows_pts = torch.rand(6, 333, 2, generator=g, dtype=dtype)
    idx = torch.tensor([0, 6, 3, 3, 1, 5])
    out[f"shared_{dtype}"] = ops.point_mask_sample_shared(masks, pts)
    out[f"shared_float_{dtype}"] = ops.point_mask_sample_shared(logits[:, None], pts)
    out[f"rows_{dtype}"] = ops.point_mask_sample_rows(logits, idx, rows_pts)
    gt = masks.flatten(0, 1)
    valid = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.uint8)
    gidx = torch.tensor([9, 0, 4, 4, 2, 7])
    for k, t in enumerate(ops.point_mask_loss_fwd(logits, gt, rows_pts, idx, gidx, valid)):
        out[f"loss_{k}_{dtype}"] = t
torch.save(out, sys.argv[1])
"""


def test_point_sampling_has_the_same_bits_on_both_code_paths(tmp_path):
    _avx2_or_skip()
    results = {}
    for isa in ("baseline", None):
        path = tmp_path / f"{isa}.pt"
        run = subprocess.run([sys.executable, "-c", _SAMPLES, str(path)], cwd=REPO, env=_env(isa),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[isa] = torch.load(path, weights_only=True)
    assert results["baseline"].keys() == results[None].keys()
    for name, expected in results["baseline"].items():
        got = results[None][name]
        assert got.abs().sum() > 0, name  # something was sampled
        assert torch.equal(got, expected), f"{name}: AVX2 and baseline code differ by {(got - expected).abs().max()}"
