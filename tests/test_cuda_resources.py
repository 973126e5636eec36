"""The CUDA resource check (scripts/cuda_resources.py) on recorded ptxas output, without nvcc or a GPU.

CI runs the real thing (scripts/ci_cuda_check.sh: every csrc/**/*.cu compiled for sm_80 and sm_90 with
-Xptxas -v, each kernel checked against its launch configuration); these tests make sure the parser
reads what ptxas prints and that the checker flags what cannot launch.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("cuda_resources", REPO / "scripts" / "cuda_resources.py")
cr = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cr  # dataclasses look their module up there
_spec.loader.exec_module(cr)

# Recorded from `python scripts/cuda_resources.py compile` (nvcc 13.0) on csrc/ of this repository:
# one ms_deform_attn instantiation and the paste kernel, sm_80 and sm_90 (sm_90 omits cmem[0]).
MSDA_SAMPLE = """\
== csrc/ms_deform_attn/ms_deform_attn_cuda.cu
ptxas info    : 28 bytes gmem, 224 bytes cmem[4]
ptxas info    : Compiling entry function '_ZN10cropformer4msda55_GLOBAL__N__8d142902_22_ms_deform_attn_cuda_cu_a09be0fa14forward_kernelIffEEvPKT_PKlS7_S5_S5_PS3_NS1_4DimsE' for 'sm_80'
ptxas info    : Function properties for _ZN10cropformer4msda55_GLOBAL__N__8d142902_22_ms_deform_attn_cuda_cu_a09be0fa14forward_kernelIffEEvPKT_PKlS7_S5_S5_PS3_NS1_4DimsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 456 bytes cmem[0]
ptxas info    : Compile time = 12.029 ms
ptxas info    : Compiling entry function '_ZN10cropformer4msda55_GLOBAL__N__8d142902_22_ms_deform_attn_cuda_cu_a09be0fa14forward_kernelIffEEvPKT_PKlS7_S5_S5_PS3_NS1_4DimsE' for 'sm_90'
ptxas info    : Function properties for _ZN10cropformer4msda55_GLOBAL__N__8d142902_22_ms_deform_attn_cuda_cu_a09be0fa14forward_kernelIffEEvPKT_PKlS7_S5_S5_PS3_NS1_4DimsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 37 registers, used 0 barriers
ptxas info    : Compile time = 21.147 ms
"""
PASTE_SAMPLE = """\
== csrc/paste/paste_cuda.cu
ptxas info    : Compiling entry function '_ZN52_GLOBAL__N__720f3277_13_paste_cuda_cu_2cff1cb8_1303121paste_entities_kernelEPKfPKiS1_S3_S1_S3_S3_S3_S3_iiiiiiifiPiPdPyS6_' for 'sm_80'
ptxas info    : Function properties for _ZN52_GLOBAL__N__720f3277_13_paste_cuda_cu_2cff1cb8_1303121paste_entities_kernelEPKfPKiS1_S3_S1_S3_S3_S3_S3_iiiiiiifiPiPdPyS6_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 272 bytes smem, 496 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN52_GLOBAL__N__720f3277_13_paste_cuda_cu_2cff1cb8_1303121paste_entities_kernelEPKfPKiS1_S3_S1_S3_S3_S3_S3_iiiiiiifiPiPdPyS6_' for 'sm_90'
ptxas info    : Function properties for _ZN52_GLOBAL__N__720f3277_13_paste_cuda_cu_2cff1cb8_1303121paste_entities_kernelEPKfPKiS1_S3_S1_S3_S3_S3_S3_iiiiiiifiPiPdPyS6_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 272 bytes smem
"""
PTXAS_SAMPLE = MSDA_SAMPLE + PASTE_SAMPLE
# All three kernels (the backward's report made from the forward's: only the names matter here).
FULL_SAMPLE = PTXAS_SAMPLE + MSDA_SAMPLE.replace("14forward_kernel", "15backward_kernel")

# An invented kernel that cannot launch with 512 threads: 255 registers, spills, 40 KiB static smem.
BAD_SAMPLE = """\
ptxas info    : Compiling entry function '_Z10big_kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z10big_kernelPf
    16 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 40960 bytes smem, 360 bytes cmem[0]
"""


def test_parse_recorded_ptxas():
    usages = cr.parse_ptxas(PTXAS_SAMPLE)
    got = [(u.arch, cr.kernel_name(u.symbol, cr.LAUNCHES), u.registers, u.static_smem) for u in usages]
    assert got == [(80, "forward_kernel", 40, 0), (90, "forward_kernel", 37, 0),
                   (80, "paste_entities_kernel", 56, 272), (90, "paste_entities_kernel", 64, 272)]
    bad = cr.parse_ptxas(BAD_SAMPLE)[0]
    assert (bad.registers, bad.static_smem, bad.stack, bad.spill_stores, bad.spill_loads) == (255, 40960, 16, 24, 16)


def test_kernel_names_from_mangled_symbols():
    usages = cr.parse_ptxas(PTXAS_SAMPLE)
    assert cr.kernel_name(usages[0].symbol, ["backward_kernel", "forward_kernel"]) == "forward_kernel"
    assert cr.kernel_name(usages[0].symbol, ["backward_kernel"]) is None


def test_violations_flag_what_cannot_launch():
    bad = cr.parse_ptxas(BAD_SAMPLE)[0]
    problems = cr.violations(bad, threads=512, max_dynamic_smem=16 * 1024)
    assert any("registers" in p for p in problems), problems  # 512 x 256 > 65536
    assert not any("registers" in p for p in cr.violations(bad, threads=256, max_dynamic_smem=0))  # 256 x 256
    assert any("shared memory 40960 static + 16384 dynamic" in p for p in problems), problems
    assert any("spills" in p for p in problems), problems
    assert cr.violations(bad, threads=1025, max_dynamic_smem=0, allowed_spill_bytes=64)[0].startswith("1025 threads")
    ok = cr.parse_ptxas(PTXAS_SAMPLE)[0]
    assert cr.violations(ok, threads=256, max_dynamic_smem=0) == []
    # Register allocation is per warp in units of 8 per thread: 129 registers count as 136.
    ok.registers = 129
    assert cr.violations(ok, threads=480, max_dynamic_smem=0) == []  # 136 x 480 = 65280
    assert cr.violations(ok, threads=512, max_dynamic_smem=0)  # 136 x 512 > 65536
    # Opting in raises the shared-memory limit to the architecture's maximum.
    assert cr.violations(ok, threads=256, max_dynamic_smem=100 * 1024)
    assert cr.violations(ok, threads=256, max_dynamic_smem=100 * 1024, opt_in_smem=True) == []


def test_static_plus_dynamic_shared_memory():
    """The paste kernel's 272 bytes of static shared memory do not fit beside 48 KiB of dynamic."""
    paste = [u for u in cr.parse_ptxas(PTXAS_SAMPLE) if "paste_entities_kernel" in u.symbol][0]
    assert cr.violations(paste, 256, 48 * 1024 - 272) == []
    assert cr.violations(paste, 256, 48 * 1024 - 271)


def test_launch_table_names_every_global_kernel():
    kernels = cr.global_kernels()
    count = sum(len(re.findall(r"__global__", p.read_text())) for p in (REPO / "csrc").rglob("*.cu"))
    assert len(kernels) == count > 0, f"the __global__ pattern missed a kernel: found {sorted(kernels)}"
    assert set(kernels) == set(cr.LAUNCHES), (
        f"scripts/cuda_resources.py LAUNCHES must list every __global__ kernel of csrc/ (and no other): "
        f"kernels {sorted(kernels)}, table {sorted(cr.LAUNCHES)}")
    for name, launch in cr.LAUNCHES.items():
        assert kernels[name] == launch.source, f"{name} is defined in {kernels[name]}, table says {launch.source}"
        assert 32 <= cr.threads_of(launch) <= 1024


def _launches(**paste_overrides):
    table = dict(cr.LAUNCHES)
    table["paste_entities_kernel"] = cr.Launch(**{**vars(table["paste_entities_kernel"]), **paste_overrides})
    return table


def test_check_of_the_recorded_sample_with_the_real_table():
    lines, failures = cr.check(FULL_SAMPLE, [80, 90])
    assert failures == [], failures
    # forward, backward, paste x 2 archs; paste opts in to the larger limit (issue 14, fixed)
    assert sum(line.startswith("ok") for line in lines) == 6, lines


def test_check_reports_missing_architectures_and_kernels():
    sample = FULL_SAMPLE
    _, failures = cr.check(sample, [80, 90], _launches(max_dynamic_smem=1024, known_failure=""))
    assert failures == []
    _, failures = cr.check(sample, [80, 90, 100], _launches(max_dynamic_smem=1024, known_failure=""))
    assert len(failures) == 3 and all("sm_100" in f and "no ptxas report" in f for f in failures), failures
    _, failures = cr.check(PTXAS_SAMPLE, [80], _launches(max_dynamic_smem=1024, known_failure=""))
    assert failures == ["sm_80 backward_kernel: no ptxas report (not compiled, or the log lacks -Xptxas -v)"]
    _, failures = cr.check("[3/5] nvcc ... ms_deform_attn_cuda.cu\nbuilding 'cropformer._C'\n", [80, 90])
    assert len(failures) == 1 and "no ptxas -v report" in failures[0], failures


@pytest.mark.parametrize("known_failure", ["", "reported bug"])
def test_known_failure_is_strict(known_failure):
    """A violation fails the check unless it is a known failure; a known failure that passes fails too.
    (Paste as its launcher was before issue 14: 48 KiB of dynamic memory without opting in.)"""
    sample = FULL_SAMPLE
    lines, failures = cr.check(sample, [80, 90], _launches(max_dynamic_smem=48 * 1024, opt_in_smem=False,
                                                           known_failure=known_failure))
    if known_failure:
        assert failures == [] and sum(line.startswith("XFAIL") and "49424 bytes" in line for line in lines) == 2
    else:
        assert len(failures) == 2 and all("49424 bytes > 49152" in f for f in failures), failures
    _, failures = cr.check(sample, [80, 90], _launches(max_dynamic_smem=1024, known_failure=known_failure))
    assert bool(failures) == bool(known_failure)


def test_setup_passes_the_checked_flags_to_nvcc():
    """setup.py compiles with NVCC_FLAGS (what `compile` reads), plus -Xptxas -v under
    CROPFORMER_PTXAS_VERBOSE=1 (what gpu_suite.sh's resource step reads) and CROPFORMER_NVCC_FLAGS."""
    import subprocess

    import torch

    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: setup.py builds no CUDA sources")
    probe = ("import setuptools\n"
             "setuptools.setup = lambda **kw: print(kw['ext_modules'][0].extra_compile_args['nvcc'])\n"
             "exec(compile(open('setup.py').read(), 'setup.py', 'exec'),\n"
             "     {'__name__': '__main__', '__file__': 'setup.py'})\n")
    env = dict(os.environ, CROPFORMER_BUILD_EXT="1", CROPFORMER_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="8.0",
               CROPFORMER_PTXAS_VERBOSE="1", CROPFORMER_NVCC_FLAGS="-DPROBE=1")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    if "no CUDA build is possible" in proc.stderr:
        pytest.skip("no CUDA toolkit (nvcc) here")
    assert proc.returncode == 0, proc.stderr[-2000:]
    flags = ast.literal_eval(proc.stdout.strip().splitlines()[-1])  # the printed list
    assert flags == [*cr.setup_nvcc_flags(), "-DPROBE=1", "-Xptxas", "-v"], flags
    assert "-O3" in flags
