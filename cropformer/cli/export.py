"""`cropformer export`: the network as a torch.export program and an AOTInductor package.

    cropformer export --ckpt model_final.safetensors --out exported/ [--mode full_crops] [--aoti]
    cropformer export --ckpt CropFormer_swin_tiny_3x.pth --cfg cropformer_swin_tiny_3x --out ct/ --size 800 1216

Writes the folder --out (refused if it exists): program.pt2, model_<device>.pt2 (--aoti), model.onnx
(--onnx), cropformer_ops.so and export.json; see `cropformer.export` for what goes in and out and how to load it with torch alone.
The program takes views of one size (--size; pad smaller views to it and give their sizes) and any batch
size (--static: 1). Then loads it in a fresh process without our code, runs it on new random inputs and
compares with the eager model (skip with --no-check; ONNX is checked when onnxruntime is installed);
prints load time, latency and the largest difference; exit status 1 when a difference exceeds 1e-2 of the
output's magnitude.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from . import UserError, add_common_options, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from ..export import MODES

    p = argparse.ArgumentParser(prog="cropformer export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="weights: ours (.safetensors/.pth) or an official checkpoint")
    p.add_argument("--cfg", default=None, help="config file or name, when the checkpoint stores none")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--mode", choices=list(MODES), default=None,
                   help="which network (views, decoder): default the config's test.mode, 'single' for Mask2Former")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help="input size of the views, multiples of 32 (default: test short side x 4/3 of it)")
    p.add_argument("--static", action="store_true", help="batch size fixed to 1 (default: any)")
    p.add_argument("--aoti", action="store_true", help="also compile an AOTInductor package (minutes on a CPU)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs onnx and onnxscript)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device the export runs on")
    p.add_argument("--no-check", action="store_true", help="skip loading the export in a fresh process")
    add_common_options(p)
    return p


# Swin-T at 800 x 1216 (random weights) measured 2e-4 (torch.export program) and 1.2e-3 (onnxruntime) relative
# to the output's magnitude (docs/BENCHMARKS.md); a wrong graph is off by O(1)
CHECK_RTOL = 1e-2


def _round32(x: float) -> int:
    return max(64, int(round(x / 32)) * 32)


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    import torch

    from ..checkpoint import load_model_weights, read_weights
    from ..config import load_config
    from ..export import MODES, STRIDE, check_export, export_model
    from ..modeling.build import build_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    if args.onnx and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        raise UserError("--onnx needs the packages onnx and onnxscript: pip install onnx onnxscript")
    state, cfg = read_weights(args.ckpt)
    if args.cfg:
        cfg = load_config(args.cfg)
    if cfg is None:
        raise UserError(f"{args.ckpt}: stores no config; pass --cfg (e.g. cropformer_swin_tiny_3x)")
    cropformer = cfg.model.meta_architecture == "cropformer"
    mode = args.mode or (cfg.test.mode if cropformer else "single")
    if MODES[mode][1] and not cropformer:
        raise UserError(f"--mode {mode}: needs a CropFormer model; {args.ckpt} is a Mask2Former baseline (use single)")
    short = cfg.input.min_size_test
    height, width = args.size or (_round32(short), _round32(short * 4 / 3))
    if height % STRIDE or width % STRIDE or min(height, width) < 2 * STRIDE:
        raise UserError(f"--size {height} {width}: must be multiples of {STRIDE}, at least {2 * STRIDE}")
    model = build_model(cfg.model)
    load_model_weights(model, state, source=str(args.ckpt), strict=True)
    model = model.to(args.device).eval()

    try:
        meta = export_model(model, cfg, args.out, mode=mode, height=height, width=width, dynamic=not args.static,
                            aoti=args.aoti, onnx=args.onnx, source=str(args.ckpt))
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    print(json.dumps({"out": args.out, "mode": mode, "views": meta["views"], "dynamic": meta["dynamic"],
                      "files": [meta["program"], *meta["aoti"].values(), *([meta["onnx"]] if meta["onnx"] else []),
                                meta["ops_library"]], **meta["timings"]}))
    if args.no_check:
        return 0
    kinds = ["program", *meta["aoti"]] + (["onnx"] if meta["onnx"] and importlib.util.find_spec("onnxruntime") else [])
    failed = []
    for kind in kinds:
        # batch 1: not the batch a dynamic export was traced with (2)
        report = check_export(args.out, model, kind=kind, height=height, width=width, batch=1)
        print(json.dumps({"check": kind, **report}))
        if any(d > CHECK_RTOL * max(1.0, m) for d, m in zip(report["max_abs_diff"], report["max_abs"])):
            failed.append(kind)
    if failed:
        print(f"error: {args.out}: {', '.join(failed)} differs from the eager model by more than {CHECK_RTOL:g} "
              "relative (see the check lines above)", file=sys.stderr)
        return 1
    return 0
