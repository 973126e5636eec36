"""`cropformer train`: train CropFormer or the Mask2Former entity baseline.

    torchrun --nproc_per_node N train.py --cfg configs/cropformer_swin_tiny_3x.json [--set k=v ...]
    torchrun train.py --cfg swin_t_1x.json            # a name is looked up in configs/
    python train.py --cfg tiny --set data.train_json=... data.train_images=...
    python train.py --demo                            # synthetic data, tiny model, CPU, a few minutes

Writes to `output_dir`: metrics.jsonl, loss_curve.png, last_checkpoint.pth (atomic), and at the end
model_final.safetensors (+ .json config) and, with validation data, eval results.
Killed at any moment, `--resume OUTPUT_DIR/last_checkpoint.pth` continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import Config, load_config
from . import UserError, add_common_options, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cropformer train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default=None, help="config file or name in configs/ (default: tiny_demo with --demo)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. solver.max_iter=100 (may be given more than once)")
    p.add_argument("--resume", default=None, help="training checkpoint to continue from (exactly)")
    p.add_argument("--init", default=None, help="initial weights: ours (.safetensors/.pth) or an official checkpoint")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--demo", action="store_true", help="generate the synthetic set if missing, train the tiny model, evaluate, draw")
    add_common_options(p)
    return p


def check_inputs(args, cfg: Config) -> None:
    """Refuse, before anything is built, inputs that would stop the run later: files that are not there,
    training data that is not set, a GPU that is not there, an output folder that is a file."""
    import torch

    for option, path in (("--resume", args.resume), ("--init", args.init)):
        if path and not Path(path).is_file():
            raise UserError(f"{option} {path}: no such file")
    if not args.demo:  # the demo generates its data
        if not cfg.data.train_json or not cfg.data.train_images:
            raise UserError("no training data: set data.train_json and data.train_images in the config or with "
                            "--set data.train_json=PATH data.train_images=FOLDER")
        for key in ("train_json", "train_images", "val_json", "val_images"):
            value = getattr(cfg.data, key)
            if value and not Path(value).exists():
                raise UserError(f"data.{key}: {value} does not exist (set it in the config or with --set data.{key}=PATH)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here; train with --device cpu")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out}: exists and is not a folder")


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    cfg = load_config(args.cfg or ("tiny_demo" if args.demo else "cropformer_swin_tiny_3x"), args.set)
    check_inputs(args, cfg)
    if args.demo:
        from ..demo import run_demo

        summary = run_demo(cfg, device=args.device or "cpu", resume=args.resume)
    else:
        from ..engine import train
        from ..evaluation import make_evaluator

        evaluate_fn = make_evaluator(cfg) if cfg.data.val_json else None
        summary = train(cfg, resume=args.resume, init_weights=args.init, device=args.device, evaluate_fn=evaluate_fn)
    from ..distributed import cleanup, get_rank

    if get_rank() == 0:
        print(json.dumps(summary, indent=1, default=str))
    cleanup()
    return 0

