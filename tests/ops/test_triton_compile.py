"""Every Triton kernel compiled to sm_80 and sm_90 GPU code, without a GPU.

The CPU tests run the kernels under the Triton interpreter, which accepts code the compiler rejects
(and ignores shared-memory limits). `scripts/triton_compile_check.py` runs each op's launchers, forward
and backward, for every dtype the op's `auto` accepts for Triton, records each launch (kernel, argument
types, constexprs, num_warps, num_stages) instead of running it, and compiles it with Triton's compiler
for each architecture. This module runs it once (in a subprocess: the compiler needs TRITON_INTERPRET=0,
which this process cannot switch back to) and checks its records. Compiled kernels are cached by Triton,
so a rerun takes seconds; a cold run is about 2.5 CPU minutes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

ARCHS = (80, 90)
OPS = ("ms_deform_attn", "masked_attention", "point_mask", "paste")


pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    pytest.importorskip("triton.compiler")
    out = tmp_path_factory.mktemp("triton_compile") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, str(REPO / "scripts" / "triton_compile_check.py"), "--json", str(out),
           "--jobs", str(min(2, os.cpu_count() or 1)), "--arch", *map(str, ARCHS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=1800)
    # Exit 1 = some kernel failed (checked per kernel below); anything else is a crash of the checker.
    assert proc.returncode in (0, 1) and out.exists(), f"checker crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def _failures(records):
    """One message per failed record; the compiler's own diagnostics (MLIR) go to stderr:
    `python scripts/triton_compile_check.py --only KERNEL` shows them."""
    return [f"sm_{r['arch']} {r['launch']}:\n    " + "\n    ".join(r["problems"])
            + f"\n    (details: python scripts/triton_compile_check.py --only {r['kernel'].split('.')[-1]})"
            for r in records if not r["ok"]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", OPS)
def test_kernels_compile(compile_report, op, arch):
    """Each launch configuration of the op's kernels compiles for the architecture within its limits."""
    records = [r for r in compile_report["records"] if r["kernel"].startswith(op + ".") and r["arch"] == arch]
    assert records, f"no {op} kernel was compiled for sm_{arch}"
    assert not _failures(records), "\n".join(_failures(records))


def test_every_kernel_has_a_compile_case(compile_report):
    """100% coverage: every @triton.jit function of kernels/*.py is launched by a case or called from a
    launched kernel, and every launched kernel was compiled for every architecture."""
    assert compile_report["jit_functions"], "no Triton kernels found"
    assert not compile_report["uncovered"], f"kernels without a compile case: {compile_report['uncovered']}"
    kernels = {name for name in compile_report["jit_functions"] if name.rsplit(".", 1)[1].endswith("_kernel")}
    for arch in ARCHS:
        compiled = {r["kernel"] for r in compile_report["records"] if r["arch"] == arch}
        assert kernels <= compiled, f"sm_{arch}: never compiled {sorted(kernels - compiled)}"


_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


@pytest.mark.parametrize("op, kernel_module", [
    ("ms_deform_attn", "ms_deform_attn"),
    ("masked_cross_attention", "masked_attention"),
    ("point_mask_cost", "point_mask"),
    ("point_mask_loss", "point_mask"),
    ("sample_uncertain_points", "point_mask"),
])
def test_every_triton_dtype_is_compiled(compile_report, op, kernel_module):
    """Each dtype the op's `auto` may send to Triton on a GPU reaches a compiled kernel as that dtype.
    (paste_entities is not listed: its fast paths cast the logits to float32 first.)"""
    from cropformer.ops._dispatch import PREFERENCES

    assert op in PREFERENCES, f"{op} is not registered with cropformer.ops._dispatch.register_op"
    triton_ok = dict((name, ok) for name, ok, _ in PREFERENCES[op])["triton"]
    accepted = [d for d in _POINTER if triton_ok(torch.device("cuda"), d)]
    assert accepted, f"{op}: auto accepts no dtype for Triton?"
    for arch in ARCHS:
        seen = set().union(*(r["pointer_types"] for r in compile_report["records"]
                             if r["kernel"].startswith(kernel_module + ".") and r["arch"] == arch))
        missing = [str(d) for d in accepted if _POINTER[d] not in seen]
        assert not missing, f"{op}: auto accepts {missing} for Triton but no kernel was compiled for them (sm_{arch})"
