"""Check every CUDA kernel's resources (ptxas -v) against the launch configuration its launcher uses.

A kernel whose registers x threads or static + dynamic shared memory exceed what one block may have
fails at launch ("too many resources requested", "invalid argument"); spills are slow. Both show in
`ptxas -v` output, which this script reads, without a GPU:

    python scripts/cuda_resources.py compile [--arch 80 90] [--log FILE]   # device-only nvcc of csrc/**/*.cu
    python scripts/cuda_resources.py check LOG [--arch 80 90]              # a build log made with -Xptxas -v

`compile` runs nvcc once per .cu file with `--fatbin` (device code only: the host compile of torch's
headers, most of the extension build's time, is skipped), the flags of setup.py, and `-Xptxas -v` for
every architecture. `check` reads any such log, e.g. `setup.py build_ext` with CROPFORMER_PTXAS_VERBOSE=1.
Both exit 1 when a kernel breaks a limit, when a __global__ kernel of csrc/ has no entry in LAUNCHES, or
when a kernel has no ptxas report for a requested architecture.
"""
from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


@dataclass(frozen=True)
class Launch:
    """How the launcher starts a kernel: `threads` per block (a number, or the name of a constexpr int
    of `source` to read it from) and the most dynamic shared memory (bytes) it may request."""

    source: str
    threads: int | str
    max_dynamic_smem: int
    opt_in_smem: bool = False  # the launcher raises the block's shared-memory limit (cudaFuncSetAttribute)
    known_failure: str = ""  # a reported bug: the check must fail until it is fixed (as xfail strict)


# Every __global__ kernel of csrc/ (tests/test_cuda_resources.py checks that this names them all).
LAUNCHES = {
    # ms_deform_attn_cuda.cu: <<<num_blocks(rows), kThreads, 0, stream>>>, no dynamic shared memory.
    "forward_kernel": Launch("csrc/ms_deform_attn/ms_deform_attn_cuda.cu", "kThreads", 0),
    "backward_kernel": Launch("csrc/ms_deform_attn/ms_deform_attn_cuda.cu", "kThreads", 0),
    # paste_cuda.cu: dynamic smem Q * 17 bytes; the launcher adds the static part and opts in to the
    # device's larger limit when the default 48 KiB is not enough. Checked at 48 KiB of dynamic memory
    # (Q = 2891), the most the launcher allowed before issue 14, so every query count that was accepted
    # then still launches.
    "paste_entities_kernel": Launch("csrc/paste/paste_cuda.cu", "kThreads", 48 * 1024, opt_in_smem=True),
}

# Per-block limits (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability").
REGS_PER_BLOCK = 65536
REG_ALLOC_UNIT = 8  # registers are allocated per warp in units of 256, i.e. 8 per thread
MAX_THREADS = 1024
DEFAULT_SMEM = 48 * 1024  # without opting in
OPT_IN_SMEM = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
               100: 227 * 1024, 120: 99 * 1024}


@dataclass
class Usage:
    """One kernel's resources on one architecture, as ptxas reported them."""

    arch: int
    symbol: str  # mangled entry name
    registers: int = 0
    static_smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> list[Usage]:
    """Entry functions of `ptxas -v` output (any number of files and architectures)."""
    out: list[Usage] = []
    current: Usage | None = None
    props_for = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = Usage(arch=int(m.group(2)), symbol=m.group(1))
            out.append(current)
        elif m := _PROPS.search(line):
            props_for = m.group(1)  # also printed for non-inlined device functions: keep entries only
        elif (m := _FRAME.search(line)) and current is not None and props_for == current.symbol:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif (m := _USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            smem = _SMEM.search(line)
            current.static_smem = int(smem.group(1)) if smem else 0
            current = None
    return out


_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


def global_kernels(csrc: Path = CSRC) -> dict[str, str]:
    """{kernel name: source path relative to the repository} for every __global__ function in csrc/."""
    found = {}
    for path in sorted(csrc.rglob("*.cu")) + sorted(csrc.rglob("*.cuh")):
        for name in _GLOBAL.findall(path.read_text()):
            found[name] = str(path.relative_to(csrc.parent))
    return found


def threads_of(launch: Launch, root: Path = ROOT) -> int:
    if isinstance(launch.threads, int):
        return launch.threads
    text = (root / launch.source).read_text()
    m = re.search(rf"constexpr\s+int\s+{launch.threads}\s*=\s*(\d+)\s*;", text)
    if m is None:
        raise ValueError(f"{launch.source}: no `constexpr int {launch.threads} = N;` to read the block size from")
    return int(m.group(1))


def kernel_name(symbol: str, names) -> str | None:
    """The kernel a (mangled) symbol belongs to: Itanium mangling spells a name as <length><name>."""
    for name in names:
        if symbol == name or f"{len(name)}{name}" in symbol:
            return name
    return None


def demangle(symbols: list[str]) -> dict[str, str]:
    """{symbol: demangled signature}, via c++filt when installed (for the report only)."""
    names = {s: s for s in symbols}
    if symbols and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True).stdout
        names.update(zip(symbols, out.splitlines()))
    return names


def violations(usage: Usage, threads: int, max_dynamic_smem: int, opt_in_smem: bool = False,
               allowed_spill_bytes: int = 0) -> list[str]:
    """What makes this kernel unlaunchable (or spill) with this block size and dynamic shared memory."""
    problems = []
    regs_per_thread = -(-usage.registers // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps = -(-threads // 32)
    if threads > MAX_THREADS:
        problems.append(f"{threads} threads per block > {MAX_THREADS}")
    if regs_per_thread * warps * 32 > REGS_PER_BLOCK:
        problems.append(f"{usage.registers} registers x {threads} threads > {REGS_PER_BLOCK} per block")
    limit = OPT_IN_SMEM.get(usage.arch, DEFAULT_SMEM) if opt_in_smem else DEFAULT_SMEM
    if usage.static_smem + max_dynamic_smem > limit:
        problems.append(f"shared memory {usage.static_smem} static + {max_dynamic_smem} dynamic = "
                        f"{usage.static_smem + max_dynamic_smem} bytes > {limit} per block")
    if usage.spill_stores + usage.spill_loads > allowed_spill_bytes:
        problems.append(f"spills {usage.spill_stores} bytes stored, {usage.spill_loads} loaded")
    return problems


def check(text: str, archs: list[int], launches: dict[str, Launch] = LAUNCHES,
          root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(report lines, failures) for the ptxas output `text`. A kernel with a `known_failure` whose check
    fails is reported as XFAIL; one that passes is a failure (the table must be updated)."""
    usages = parse_ptxas(text)
    if not usages:
        return [], ["no ptxas -v report in the output: build with CROPFORMER_PTXAS_VERBOSE=1 and keep the compiler's "
                    "output (pip shows it only with -v), or run scripts/ci_cuda_check.sh without a log"]
    pretty = demangle(sorted({u.symbol for u in usages}))
    lines, failures = [], []
    kernels = global_kernels(root / "csrc")
    for name in sorted(set(kernels) - set(launches)):
        failures.append(f"{name} ({kernels[name]}): no launch configuration in scripts/cuda_resources.py LAUNCHES")
    for name, launch in sorted(launches.items()):
        threads = threads_of(launch, root)
        mine = [u for u in usages if kernel_name(u.symbol, [name]) == name]
        failures += [f"sm_{arch} {name}: no ptxas report (not compiled, or the log lacks -Xptxas -v)"
                     for arch in archs if not any(u.arch == arch for u in mine)]
        problems = []
        for u in mine:
            full = pretty[u.symbol]  # e.g. "void ns::forward_kernel<float, float>(float const*, ...)"
            label = full[full.find(name):].split("(")[0] if name in full else name
            bad = violations(u, threads, launch.max_dynamic_smem, launch.opt_in_smem)
            status = ("XFAIL" if launch.known_failure else "FAIL") if bad else "ok  "
            lines.append(f"{status} sm_{u.arch} {label}: {u.registers} regs x {threads} "
                         f"threads, smem {u.static_smem} static + {launch.max_dynamic_smem} dynamic, stack {u.stack}, "
                         f"spills {u.spill_stores}/{u.spill_loads}")
            problems += [f"sm_{u.arch} {name}: {p}" for p in bad]
        if launch.known_failure and problems:
            lines += [f"XFAIL {p} ({launch.known_failure})" for p in problems]
        elif launch.known_failure:
            failures.append(f"{name}: passes now; remove its known_failure in LAUNCHES ({launch.known_failure})")
        else:
            failures += problems
    return lines, failures


def setup_nvcc_flags() -> list[str]:
    """setup.py's NVCC_FLAGS, read from its source: one list for the build and this check."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets))


def nvcc_flags() -> list[str]:
    """setup.py's NVCC_FLAGS, torch's common nvcc flags and include folders, as the extension build has them."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    setup_flags = setup_nvcc_flags()
    std = "c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14) else "c++17"
    includes = [str(CSRC), *cpp_extension.include_paths("cuda"), sysconfig.get_paths()["include"]]
    purelib = Path(sysconfig.get_paths()["purelib"])
    includes += [str(p) for p in sorted(purelib.glob("nvidia/cu*/include"))]  # torch's CUDA runtime wheel
    return [*setup_flags, *cpp_extension.COMMON_NVCC_FLAGS, "-DWITH_CUDA", f"-std={std}",
            *(f"-I{d}" for d in includes)]


def compile_device_code(archs: list[int], nvcc: str = "nvcc") -> str:
    """Device-only compile of every csrc/**/*.cu for `archs`; returns the combined nvcc/ptxas output.
    Raises CalledProcessError (with the output) when a file does not compile."""
    flags = nvcc_flags()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    output = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(CSRC.rglob("*.cu")):
            cmd = [nvcc, "--fatbin", "-o", str(Path(tmp) / (src.stem + ".fatbin")), *gencode, "-Xptxas", "-v",
                   *flags, str(src)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            output.append(f"== {src.relative_to(ROOT)}\n{proc.stdout}{proc.stderr}")
            if proc.returncode:
                raise subprocess.CalledProcessError(proc.returncode, cmd, "".join(output))
    return "".join(output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="device-only nvcc of csrc/**/*.cu with -Xptxas -v, then check")
    comp.add_argument("--log", type=Path, help="also write the nvcc/ptxas output here")
    chk = sub.add_parser("check", help="check a build log that holds ptxas -v output")
    chk.add_argument("log", type=Path)
    for p in (comp, chk):
        p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities x10")
    args = parser.parse_args(argv)
    if args.command == "compile":
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            print("cuda_resources: nvcc not found", file=sys.stderr)
            return 1
        try:
            text = compile_device_code(args.arch, nvcc)
        except subprocess.CalledProcessError as exc:
            print(exc.output[-5000:], file=sys.stderr)
            print(f"cuda_resources: nvcc failed: {' '.join(exc.cmd[-1:])}", file=sys.stderr)
            return 1
        if args.log:
            args.log.write_text(text)
    else:
        text = args.log.read_text(errors="replace")
    lines, failures = check(text, args.arch)
    print("\n".join(lines))
    for f in failures:
        print(f"FAILED {f}")
    print(f"cuda_resources: {len(failures)} failure(s); {len(parse_ptxas(text))} kernel x arch reports checked")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
