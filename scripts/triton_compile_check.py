"""Compile every Triton kernel of cropformer to GPU code for given architectures, without a GPU.

The Triton interpreter (what the CPU tests run) accepts code that the compiler rejects, so each kernel
is also compiled here the way a GPU launch would compile it:

1. Each op's launchers (kernels/*.py) run on small CPU tensors of every dtype the op's `auto` accepts for
   Triton, forward and backward, with `JITFunction.run` replaced by a recorder: every launch gives the
   kernel, the argument types, the constexprs and the options (num_warps, num_stages) exactly as the
   launcher chose them. Nothing runs.
2. Each distinct launch is compiled with Triton's compiler for each architecture
   (`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`), specialised as a launch
   specialises it: integer arguments equal to 1 are constexprs, pointers aligned to 16 bytes and
   integers divisible by 16 carry the divisibility hint (as torch's allocations on a GPU are aligned).
3. Resources are checked: shared memory against the architecture's per-block maximum, and, when
   ptxas is installed, registers x threads and spills as reported by `ptxas -v` on the kernel's PTX
   (parsed by scripts/cuda_resources.py).

Usage: python scripts/triton_compile_check.py [--arch 80 90] [--json FILE]
Exit status 1 when a kernel fails to compile or breaks a limit. The compiled kernels land in Triton's
cache (TRITON_CACHE_DIR), so a second run takes seconds.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret; before triton is imported

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_resources  # noqa: E402

KERNEL_MODULES = ("ms_deform_attn", "masked_attention", "point_mask", "paste")


def _divisible(value) -> bool:
    """Triton's alignment specialisation: a 16-byte aligned pointer, an integer divisible by 16."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


@dataclass
class Launch:
    case: str  # e.g. "ms_deform_attn bfloat16"
    fn: JITFunction
    args: dict  # parameter name -> value as passed
    options: dict  # num_warps, num_stages, ...
    signature: dict = field(default_factory=dict)
    constexprs: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        for i, param in enumerate(self.fn.params):
            value = self.args[param.name] if param.name in self.args else param.default
            kind = "constexpr" if param.is_constexpr else mangle_type(value, not param.do_not_specialize)
            self.signature[param.name] = kind  # an int equal to 1 is a constexpr, as in a launch
            if kind == "constexpr":
                self.constexprs[(i,)] = value
            elif not (param.do_not_specialize or param.do_not_specialize_on_alignment) and _divisible(value):
                self.attrs[(i,)] = BaseBackend.parse_attr("D")

    def key(self):
        return (self.fn.fn.__module__, self.fn.__name__, tuple(self.signature.items()), tuple(self.attrs),
                tuple((k, repr(v)) for k, v in self.constexprs.items()), tuple(sorted(self.options.items())))

    def describe(self) -> str:
        consts = {self.fn.arg_names[i[0]]: v for i, v in self.constexprs.items()}
        ptrs = sorted({t for t in self.signature.values() if t.startswith("*")})
        return (f"{self.fn.__name__} [{self.case}] {','.join(ptrs)} "
                f"{' '.join(f'{k}={v}' for k, v in consts.items())} {self.options}")


@contextmanager
def recording(case: str, launches: list[Launch]):
    """Within: a kernel launch records itself instead of running (outputs stay uninitialised)."""
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        launches.append(Launch(case, self, bound, options))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


# --------------------------------------------------------------------------------------------------
# Launch cases: each op's launchers on small CPU tensors, forward and backward, with the sizes and
# dtypes the model uses (the launchers derive block sizes from them).


def triton_dtypes(op: str) -> list[torch.dtype]:
    """Dtypes the op's `auto` accepts for Triton on a GPU (its dispatch preference, asked for "cuda")."""
    import cropformer.ops  # noqa: F401  (fills the registry)
    from cropformer.ops._dispatch import PREFERENCES

    available = dict((name, ok) for name, ok, _ in PREFERENCES[op])["triton"]
    return [d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
            if available(torch.device("cuda"), d)]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def ms_deform_attn_cases():
    from cropformer.kernels import ms_deform_attn as k

    for dtype in triton_dtypes("ms_deform_attn"):
        # Swin-T pixel decoder: 8 heads x 32 channels, 3 levels x 4 points.
        B, H, D, L, P, Q = 1, 8, 32, 3, 4, 7
        shapes = torch.tensor([[8, 8], [4, 4], [2, 2]], dtype=torch.int64)
        starts = torch.tensor([0, 64, 80], dtype=torch.int64)
        value = torch.randn(B, 84, H, D, dtype=dtype)
        loc = torch.rand(B, Q, H, L, P, 2, dtype=dtype)
        attn = torch.rand(B, Q, H, L, P, dtype=dtype)
        yield f"ms_deform_attn {_name(dtype)}", lambda: (
            k.ms_deform_attn_forward(value, shapes, starts, loc, attn),
            k.ms_deform_attn_backward(torch.randn(B, Q, H * D, dtype=dtype), value, shapes, starts, loc, attn))


def masked_attention_cases():
    from cropformer.kernels import masked_attention as k

    for dtype in triton_dtypes("masked_cross_attention"):
        # fp32 products follow torch's TF32 switch: both settings are real launch configurations.
        for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            # Decoder: 8 heads x 32 channels, 100-200 queries. One head size per BLOCK_D the dispatch can
            # reach: D = 128 is the largest it sends to Triton (kernels.masked_attention.MAX_HEAD_DIM).
            for Q, D in ((100, 32), (150, 64), (200, 128)):
                B, H, K = 1, 8, 300
                q = torch.randn(B, H, Q, D, dtype=dtype)
                kv = torch.randn(B, H, K, D, dtype=dtype)
                logits = torch.randn(B, Q, K, dtype=dtype)

                def run(q=q, kv=kv, logits=logits, tf32=tf32):
                    saved = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    try:
                        out, lse, row_open = k.masked_attention_forward(q, kv, kv, logits)
                        k.masked_attention_backward(torch.randn_like(out), q, kv, kv, logits, out, lse, row_open)
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = saved

                yield f"masked_attention {_name(dtype)}{' tf32' if tf32 else ''} Q={Q} D={D}", run


def point_mask_cases():
    from cropformer.kernels import point_mask as k

    dtypes = sorted(set(triton_dtypes("point_mask_cost")) | set(triton_dtypes("point_mask_loss"))
                    | set(triton_dtypes("sample_uncertain_points")), key=str)
    for dtype in dtypes:
        K, N, h, w, P, M = 5, 4, 16, 16, 112, 3
        pred = torch.randn(K, h, w, dtype=dtype)
        gt = torch.rand(N, 4 * h, 4 * w) > 0.5  # compact bool masks, read in place
        points = torch.rand(M, P, 2)
        index = torch.arange(M)
        valid = torch.ones(M, dtype=torch.uint8)

        def run(pred=pred, gt=gt, points=points, index=index, valid=valid):
            k.sample_shared(pred[:, None], points[0])  # matching costs: logits and masks at shared points
            k.sample_shared(gt[:, None], points[0])
            k.sample_rows(pred, index, points)  # uncertainty of the loss candidates
            bce, dice, x, t = k.loss_fwd(pred, gt, points, index, index, valid)
            k.loss_bwd(torch.ones_like(bce), torch.ones_like(dice), points, index, x, t, tuple(pred.shape), dtype)

        yield f"point_mask {_name(dtype)}", run


def paste_cases():
    from cropformer.ops import paste as ops_paste

    # Full image + 4 corner crops (CropFormer's ensemble), both score modes; the fast path computes in fp32.
    V, Q, h, w, H, W = 5, 10, 16, 16, 70, 90
    sizes = [(64, 64)] * V
    boxes = [(0, 0, W, H), (0, 0, 60, 50), (30, 0, W, 50), (0, 20, 60, H), (30, 20, W, H)]
    logits = torch.randn(V, Q, h, w)
    scores = torch.rand(Q)
    for mode in ops_paste.SCORE_MODES:
        yield f"paste {mode}", lambda mode=mode: ops_paste._paste_fast(
            logits, sizes, boxes, scores, H, W, 0.5, mode, "triton")


CASES = (ms_deform_attn_cases, masked_attention_cases, point_mask_cases, paste_cases)


def record_launches() -> list[Launch]:
    launches: list[Launch] = []
    for make in CASES:
        for case, run in make():
            with recording(case, launches):
                run()
    return launches


def jit_functions() -> dict[str, JITFunction]:
    """Every @triton.jit function of the kernel modules, as "module.name"."""
    import importlib

    found = {}
    for mod in KERNEL_MODULES:
        module = importlib.import_module(f"cropformer.kernels.{mod}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
                found[f"{mod}.{name}"] = obj
    return found


def uncovered(launches: list[Launch]) -> list[str]:
    """JIT functions neither launched by a case nor called from a launched kernel's source."""
    launched = {id(l.fn) for l in launches}
    sources = [l.fn.src for l in launches]
    out = []
    for qualname, fn in jit_functions().items():
        called = any(f"{fn.__name__}(" in src for src in sources)
        if id(fn) not in launched and not called:
            out.append(qualname)
    return out


# --------------------------------------------------------------------------------------------------
# Compile and check


def _ptxas() -> str | None:
    """The ptxas Triton compiles with (its bundled one, or TRITON_PTXAS_PATH), else the toolkit's."""
    try:
        return triton.knobs.nvidia.ptxas.path
    except (AttributeError, RuntimeError):
        return shutil.which("ptxas")


def ptxas_usage(ptx: str, arch: int, cache_key: str) -> cuda_resources.Usage | None:
    """Registers, spills and static shared memory of one kernel from `ptxas -v` (None without ptxas);
    cached beside Triton's own cache under the compiled kernel's hash."""
    ptxas = _ptxas()
    if ptxas is None:
        return None
    cache = Path(triton.knobs.cache.dir) / "cropformer_ptxas" / f"{cache_key}_sm{arch}.json"
    if cache.exists():
        return cuda_resources.Usage(**json.loads(cache.read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""  # Triton emits sm_90a code for Hopper
        proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    usages = cuda_resources.parse_ptxas(proc.stdout + proc.stderr)
    if not usages:
        return None
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(vars(usages[0])))
    return usages[0]


def compile_one(launch: Launch, arch: int) -> dict:
    record = {"kernel": f"{launch.fn.fn.__module__.rsplit('.', 1)[-1]}.{launch.fn.__name__}", "case": launch.case,
              "arch": arch, "launch": launch.describe(), "ok": False, "problems": [],
              "pointer_types": sorted({t for t in launch.signature.values() if t.startswith("*")})}
    try:
        src = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    except Exception as exc:  # a compile error of any kind is the finding: report it, go on
        record["problems"].append(f"compile error: {type(exc).__name__}: {str(exc)[-1500:]}")
        record["traceback"] = traceback.format_exc()[-4000:]
        return record
    meta = compiled.metadata
    threads = meta.num_warps * 32 * getattr(meta, "num_ctas", 1)
    record.update(shared=meta.shared, num_warps=meta.num_warps, num_stages=meta.num_stages)
    limit = cuda_resources.OPT_IN_SMEM[arch]  # Triton opts in above 48 KiB by itself
    if meta.shared > limit:
        record["problems"].append(f"shared memory {meta.shared} bytes > {limit} on sm_{arch}")
    usage = ptxas_usage(compiled.asm["ptx"], arch, compiled.hash)
    if usage is not None:
        record.update(registers=usage.registers, spill_stores=usage.spill_stores, spill_loads=usage.spill_loads)
        usage.static_smem = 0  # Triton's shared memory is dynamic: checked above
        record["problems"] += [p for p in cuda_resources.violations(usage, threads, 0, allowed_spill_bytes=1 << 30)]
    record["ok"] = not record["problems"]
    return record


_JOBS: list[tuple[Launch, int]] = []  # (launch, arch) to compile; read by forked workers


def _compile_job(i: int) -> dict:
    return compile_one(*_JOBS[i])


def compile_all(launches: list[Launch], archs: list[int], jobs: int) -> list[dict]:
    """One record per distinct launch x arch, compiled in `jobs` forked processes."""
    distinct = {}
    for launch in launches:
        distinct.setdefault(launch.key(), launch)
    _JOBS[:] = [(launch, arch) for launch in distinct.values() for arch in archs]
    if jobs <= 1:
        return [_compile_job(i) for i in range(len(_JOBS))]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_job, range(len(_JOBS))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities x10")
    parser.add_argument("--json", type=Path, help="write the records (one per launch x arch) here")
    parser.add_argument("--only", default="", help="compile only the kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    launches = record_launches()
    records = compile_all([l for l in launches if args.only in l.fn.__name__], args.arch, args.jobs)
    for rec in records:
        spill = f" spills {rec['spill_stores']}/{rec['spill_loads']}" if "spill_stores" in rec else ""
        regs = f" {rec['registers']} regs" if "registers" in rec else ""
        print(f"{'ok  ' if rec['ok'] else 'FAIL'} sm_{rec['arch']} {rec['launch']}: shared {rec.get('shared', '?')}"
              f"{regs}{spill}" + "".join(f"\n    {p}" for p in rec["problems"]))
    missing = uncovered(launches)
    for name in missing:
        print(f"FAIL no compile case launches {name} (add one to scripts/triton_compile_check.py CASES)")
    if args.json:
        payload = {"records": records, "uncovered": missing, "cases": sorted({l.case for l in launches}),
                   "jit_functions": sorted(jit_functions())}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    failed = sum(not r["ok"] for r in records)
    print(f"triton_compile_check: {len(records)} compiles (launch x arch), {failed} failed, "
          f"{len(missing)} kernels without a case")
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
