"""Export the network for deployment: a `torch.export` program and an AOTInductor package.

    export_model(model, cfg, "exported/", mode="full_crops", aoti=True)

writes a folder that runs WITHOUT the model code, with torch and the folder only:

    program.pt2        the network as a `torch.export` program (`torch.export.load(...).module()`)
    model_<device>.pt2 (aoti=True) the same compiled ahead of time by AOTInductor
                       (`torch._inductor.aoti_load_package`)
    model.onnx         (onnx=True; needs onnx + onnxscript) ONNX, deformable attention as GridSample per
                       level: no custom op at all (onnxruntime, TensorRT, ...)
    cropformer_ops.so  our compiled kernel library (a copy of `cropformer/_C`), loaded with
                       `torch.ops.load_library`: it defines `torch.ops.cropformer_C.ms_deform_attn_forward`
    export.json        what goes in and out, the config, the versions, and the check that was run

The graph holds aten ops plus one custom op, the compiled multi-scale deformable attention kernel (C++ on
CPU, CUDA on GPU). Why not the torch reference path, so that no custom op remains: the reference reads
the level sizes back from a tensor (`spatial_shapes.tolist()`), which `torch.export` cannot trace, and on
CPU it is slower than the kernel. The Python custom op `cropformer::ms_deform_attn_fwd` that the model
calls (it picks a backend in Python) is replaced by the compiled kernel it dispatches to, so loading needs
no Python of ours. Masked attention exports as plain SDPA on CPU and as its torch reference on CUDA (the
Triton kernel is Python). Loading, as `LOADER` does:

    torch.ops.load_library("exported/cropformer_ops.so")
    net = torch.export.load("exported/program.pt2").module()   # or aoti_load_package("exported/model_cpu.pt2")
    pred_logits, pred_masks = net(images, image_sizes)

Inputs: images B x T x 3 x H x W uint8 RGB 0-255 (T = 1 for "single"/"full_image", 5 for "full_crops",
4 for "crops"), image_sizes B x T x 2 int64 (the valid rows, cols of each view; the rest is padding).
B is dynamic unless `dynamic=False`; T, H and W are fixed at export (pad smaller views to H x W and give
their sizes: padding is zeroed after normalisation, as the batched eager model does). Outputs: for the
image decoder ("single", "full_image") pred_logits (B*T) x Q x 2 and pred_masks (B*T) x Q x H/4 x W/4;
for the batch decoder ("full_crops", "full_batch", "crops") pred_logits B x Q x 2 and pred_masks
B x Q x T x H/4 x W/4. Fusing the views into entities (`cropformer.ops.paste_entities`) stays outside.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .config import Config, to_dict
from .ops._dispatch import compiled_extension, has_compiled_op

# Views per mode, and whether the batch decoder runs (as in `cropformer.inference`).
MODES = {"full_crops": (5, True), "crops": (4, True), "full_batch": (1, True), "full_image": (1, False),
         "single": (1, False)}
PROGRAM, ONNX, OPS_LIBRARY, METADATA = "program.pt2", "model.onnx", "cropformer_ops.so", "export.json"
ONNX_OPSET = 20  # GridSample's bilinear mode is named "linear" from 20 on
STRIDE = 32  # exported H and W are multiples of this (the backbone's largest stride)


class ExportedNetwork(nn.Module):
    """The part of CropFormer that is exported: preprocessing + network, raw logits out (see module doc)."""

    def __init__(self, model: nn.Module, batch_decoder: bool):
        super().__init__()
        self.model = model
        self.batch_decoder = batch_decoder

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # masks="last": the final prediction's masks only, as `Segmenter` runs (a smaller, faster graph).
        out = self.model(images, image_sizes, run_batch_decoder=self.batch_decoder, masks="last")
        out = out["batch"] if self.batch_decoder else out["image"]
        return out["pred_logits"], out["pred_masks"]


@functools.lru_cache(maxsize=None)
def _register_compiled_msda_fake() -> None:
    """Shapes of the compiled kernel for tracing (the C++ library registers only the CPU/CUDA kernels)."""

    @torch.library.register_fake("cropformer_C::ms_deform_attn_forward")
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        B, _, H, D = value.shape
        return value.new_empty(B, sampling_locations.shape[1], H * D)


def _to_compiled_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    """`cropformer::ms_deform_attn_fwd` -> the compiled kernel it calls for the "cpu" / "cuda" backends."""
    return torch.ops.cropformer_C.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                                         sampling_locations, attention_weights)


def _exportable(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `model` whose ops take paths `torch.export` can save: the compiled deformable-attention
    kernel (required), masked attention as SDPA (CPU) or its torch reference (CUDA)."""
    from .modeling.pixel_decoder import MSDeformAttn

    if not has_compiled_op("ms_deform_attn_forward"):
        raise RuntimeError("export needs the compiled extension cropformer._C (its deformable-attention kernel is "
                           "part of the exported graph); reinstall with a C++ compiler: "
                           "pip install --no-build-isolation -e .")
    model = copy.deepcopy(model).eval()
    backend = "cuda" if device.type == "cuda" else "cpu"
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.backend = backend
    model.image_decoder.attn_backend = "cpu" if device.type == "cpu" else "torch"
    return model


def example_inputs(views: int, height: int, width: int, batch: int = 1, seed: int = 0,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 views B x T x 3 x H x W and their sizes B x T x 2 (the first view full, the others
    smaller, as corner crops are), for tracing and checks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, views, 3, height, width), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([height, width]).repeat(batch, views, 1)
    sizes[:, 1:] = (sizes[:, 1:] * 0.7).long()
    return images.to(device), sizes.to(device)


def export_program(model: nn.Module, *, mode: str, height: int, width: int, dynamic: bool = True
                   ) -> torch.export.ExportedProgram:
    """`model` (a CropFormer, on its device) as an ExportedProgram of `ExportedNetwork` for `mode`.

    Args:
        height, width: the input size of the program (multiples of 32).
        dynamic: any batch size B (else B = 1). H and W stay fixed: symbolic sizes through the Swin
            window padding (multiples of 7 inside multiples of 32) make tracing take tens of minutes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    views, batch_decoder = MODES[mode]
    if batch_decoder and not getattr(model, "is_cropformer", False):
        raise ValueError(f"mode {mode!r} needs a CropFormer model; this is a Mask2Former baseline (use 'single')")
    if height % STRIDE or width % STRIDE:
        raise ValueError(f"the size {height}x{width} must be a multiple of {STRIDE}")
    device = next(model.parameters()).device
    net = ExportedNetwork(_exportable(model, device), batch_decoder)
    _register_compiled_msda_fake()
    args = example_inputs(views, height, width, batch=2 if dynamic else 1, device=device)
    with torch.no_grad():
        # eager first: each op settles its backend (and self-test) outside the tracer
        net(*args)
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        shapes = {"images": {0: batch}, "image_sizes": {0: batch}}
    program = torch.export.export(net, args, dynamic_shapes=shapes)
    return program.run_decompositions({torch.ops.cropformer.ms_deform_attn_fwd.default: _to_compiled_kernel})


def aoti_package(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Compile `program` ahead of time with AOTInductor into the package `path` (.pt2), for the
    program's device."""
    from torch._inductor import aoti_compile_and_package

    return Path(aoti_compile_and_package(program, package_path=str(path)))


def _ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The compiled kernel in ONNX ops, as `ms_deform_attn_ref` computes it (GridSample per level); traced
    by onnxscript (L and P static, the rest read from the shapes)."""
    from onnxscript import opset20 as op

    L, P = sampling_locations.shape[3], sampling_locations.shape[4]
    shape = op.Shape(value)  # B, S, H, D
    B, H, D = op.Slice(shape, [0], [1]), op.Slice(shape, [2], [3]), op.Slice(shape, [3], [4])
    BH, Q = op.Mul(B, H), op.Slice(op.Shape(sampling_locations), [1], [2])
    grids = op.Sub(op.Mul(sampling_locations, op.CastLike(2.0, value)), op.CastLike(1.0, value))
    sampled = []
    for lvl in range(L):
        hw = op.Gather(spatial_shapes, op.Constant(value_int=lvl), axis=0)
        h, w = op.Slice(hw, [0], [1]), op.Slice(hw, [1], [2])
        start = op.Gather(level_start_index, op.Constant(value_ints=[lvl]), axis=0)
        v = op.Slice(value, start, op.Add(start, op.Mul(h, w)), [1])  # B x hw x H x D
        v = op.Reshape(op.Transpose(v, perm=[0, 2, 3, 1]), op.Concat(BH, D, h, w, axis=0))  # BH x D x h x w
        g = op.Gather(grids, op.Constant(value_int=lvl), axis=3)  # B x Q x H x P x 2
        g = op.Reshape(op.Transpose(g, perm=[0, 2, 1, 3, 4]), op.Concat(BH, Q, op.Constant(value_ints=[P, 2]), axis=0))
        s = op.GridSample(v, g, mode="linear", padding_mode="zeros", align_corners=0)  # BH x D x Q x P
        sampled.append(op.Unsqueeze(s, op.Constant(value_ints=[3])))
    LP = op.Constant(value_ints=[L * P])
    stacked = op.Reshape(op.Concat(*sampled, axis=3), op.Concat(BH, D, Q, LP, axis=0))  # BH x D x Q x LP
    weights = op.Reshape(op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4]),
                         op.Concat(BH, op.Constant(value_ints=[1]), Q, LP, axis=0))  # BH x 1 x Q x LP
    out = op.ReduceSum(op.Mul(stacked, weights), op.Constant(value_ints=[3]), keepdims=0)  # BH x D x Q
    return op.Transpose(op.Reshape(out, op.Concat(B, op.Mul(H, D), Q, axis=0)), perm=[0, 2, 1])


def onnx_model(program: torch.export.ExportedProgram, path: str | Path) -> None:
    """Write `program` as ONNX to `path`, the compiled kernel translated by `_ms_deform_attn_onnx`.
    Needs the optional packages onnx and onnxscript (ImportError naming them otherwise)."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript") from exc
    table = {torch.ops.cropformer_C.ms_deform_attn_forward.default: _ms_deform_attn_onnx}
    torch.onnx.export(program, dynamo=True, opset_version=ONNX_OPSET, custom_translation_table=table).save(str(path))


# The whole loader a deployment needs (also run by `check_export` in a fresh process): torch + the folder.
LOADER = r'''
import json, statistics, sys, time
import torch

folder, kind, io_path, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
meta = json.load(open(f"{folder}/export.json"))
start = time.perf_counter()
if kind == "onnx":  # standard ONNX ops only: no library to load
    import onnxruntime
    session = onnxruntime.InferenceSession(f"{folder}/{meta['onnx']}", providers=["CPUExecutionProvider"])
    def net(images, image_sizes):
        feed = {"images": images.numpy(), "image_sizes": image_sizes.numpy()}
        return [torch.from_numpy(o) for o in session.run(None, feed)]
elif kind == "program":
    torch.ops.load_library(f"{folder}/{meta['ops_library']}")
    net = torch.export.load(f"{folder}/{meta['program']}").module()
else:
    from torch._inductor import aoti_load_package
    torch.ops.load_library(f"{folder}/{meta['ops_library']}")
    net = aoti_load_package(f"{folder}/{meta['aoti'][kind]}")
load_s = time.perf_counter() - start
io = torch.load(io_path, weights_only=True)
times = []
with torch.no_grad():
    for _ in range(repeat):
        start = time.perf_counter()
        outputs = net(io["images"], io["image_sizes"])
        times.append(time.perf_counter() - start)
torch.save({"outputs": [o.cpu() for o in outputs]}, io_path + ".out")
print(json.dumps({"load_s": load_s, "first_call_s": times[0], "latency_s": statistics.median(times[1:] or times)}))
'''


def check_export(folder: str | Path, model: nn.Module, *, kind: str = "program", height: int, width: int,
                 batch: int = 1, repeat: int = 3) -> dict:
    """Run the export in `folder` in a fresh Python process (torch only: `cropformer` is made unimportable
    there) on new inputs of `batch` x `height` x `width`, and compare with `model` run eagerly here.

    Args:
        kind: "program" (the torch.export program), "onnx" (with onnxruntime, CPU) or a device of the
            AOTInductor packages ("cpu").
    Returns:
        {"load_s", "first_call_s", "latency_s" (median of the later calls), "max_abs_diff" and "max_abs"
        (of the eager outputs): [per output], "shapes"}
        and "eager_s" (median of `repeat` eager calls here, for comparison).
    """
    folder = Path(folder)
    meta = json.loads((folder / METADATA).read_text())
    views, batch_decoder = MODES[meta["mode"]]
    device = next(model.parameters()).device
    images, sizes = example_inputs(views, height, width, batch=batch, seed=1, device=device)
    net = ExportedNetwork(model, batch_decoder).eval()
    eager_times = []
    with torch.no_grad():
        for _ in range(repeat):
            start = time.perf_counter()
            expected = net(images, sizes)
            eager_times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        io_path = os.path.join(tmp, "io.pt")
        torch.save({"images": images, "image_sizes": sizes}, io_path)
        # `import cropformer` fails in the child: the export must not need our Python code
        prelude = "import sys; sys.modules['cropformer'] = None\n"
        env = {**os.environ, "PYTHONPATH": ""}  # nor find it through the repository on the path
        proc = subprocess.run([sys.executable, "-c", prelude + LOADER, str(folder.resolve()), kind, io_path,
                               str(repeat)],
                              capture_output=True, text=True, cwd=tmp, env=env)
        if proc.returncode:
            raise RuntimeError(f"loading {folder} ({kind}) in a fresh process failed:\n{proc.stderr[-3000:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        got = torch.load(io_path + ".out", weights_only=True)["outputs"]
    report["eager_s"] = statistics.median(eager_times)
    report["max_abs_diff"] = [(g - e.cpu()).abs().max().item() for g, e in zip(got, expected)]
    report["max_abs"] = [e.abs().max().item() for e in expected]
    report["shapes"] = [list(g.shape) for g in got]
    return report


def export_model(model: nn.Module, cfg: Config, out: str | Path, *, mode: str, height: int, width: int,
                 dynamic: bool = True, aoti: bool = False, onnx: bool = False, source: str = "") -> dict:
    """Write the export folder `out` (see the module docstring); returns its metadata.

    The folder is built under a temporary name beside `out` and renamed into place at the end, so an
    interrupted export leaves no partial folder under the final name; an existing `out` is refused.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export writes a new folder (remove it or choose another --out)")
    device = next(model.parameters()).device
    timings = {}
    start = time.perf_counter()
    program = export_program(model, mode=mode, height=height, width=width, dynamic=dynamic)
    timings["export_s"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; it is an ordinary output
    try:
        torch.export.save(program, str(tmp / PROGRAM))
        shutil.copyfile(compiled_extension().__file__, tmp / OPS_LIBRARY)
        packages = {}
        if aoti:
            start = time.perf_counter()
            name = f"model_{device.type}.pt2"
            aoti_package(program, tmp / name)
            packages[device.type] = name
            timings["aoti_compile_s"] = time.perf_counter() - start
        if onnx:
            start = time.perf_counter()
            onnx_model(program, tmp / ONNX)
            timings["onnx_export_s"] = time.perf_counter() - start
        views, batch_decoder = MODES[mode]
        meta = {
            "format": "cropformer-export-v1",
            "mode": mode,
            "views": views,
            "decoder": "batch" if batch_decoder else "image",
            "inputs": {"images": f"B x {views} x 3 x H x W uint8 RGB 0-255",
                       "image_sizes": f"B x {views} x 2 int64 (valid rows, cols per view)"},
            "outputs": (["pred_logits B x Q x 2", f"pred_masks B x Q x {views} x H/4 x W/4"] if batch_decoder
                        else [f"pred_logits (B*{views}) x Q x 2", f"pred_masks (B*{views}) x Q x H/4 x W/4"]),
            "dynamic": {"B": [1, 1024]} if dynamic else False,
            "size": [height, width],
            "device": device.type,
            "program": PROGRAM,
            "aoti": packages,
            "onnx": ONNX if onnx else None,
            "ops_library": OPS_LIBRARY,
            "torch": torch.__version__,
            "source": source,
            "timings": timings,
            "config": to_dict(cfg),
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out)  # refuses (OSError) if `out` appeared meanwhile and is not empty
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return meta
