"""`cropformer convert` (also `python -m cropformer.convert`): any supported checkpoint to ours."""
from __future__ import annotations

import argparse
import sys

import torch

from . import add_common_options

def main(argv: list[str] | None = None) -> int:
    """`python -m cropformer.convert SRC DST [--cfg CONFIG] [--strict]`.

    SRC: any supported checkpoint (.pth/.pkl/.bin/.safetensors; see the module docstring).
    DST: `.safetensors` (our names; with --cfg the config goes into its metadata and beside it as
    `.json`) or `.pth` (weights only: {"model": state[, "config": dict]}).
    Prints the conversion report; with --cfg also checks that the weights fit that model (every
    missing, unexpected or reshaped key is listed) and refuses ones that do not, exit status 2.
    Without --strict a partial fit is accepted where whole components are absent (backbone-only
    ImageNet weights, a Mask2Former checkpoint for CropFormer); keys of components the config lacks
    are then left out of DST.
    """
    from ..checkpoint import WeightsMismatch, check_fit, read_checkpoint, save_weights
    from ..config import load_config

    p = argparse.ArgumentParser(prog="cropformer convert", description=main.__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint to convert")
    p.add_argument("dst", help="output file: .safetensors or .pth")
    p.add_argument("--cfg", help="config file or name: check the weights against it and store it with them")
    p.add_argument("--strict", action="store_true", help="with --cfg: refuse unless every key matches")
    add_common_options(p)
    args = p.parse_args(argv)
    if not args.dst.endswith((".safetensors", ".pth")):
        p.error(f"DST must end in .safetensors or .pth, got {args.dst!r}")
    try:
        loaded = read_checkpoint(args.src)
        print(f"{args.src}: {loaded.report.summary(limit=1000)}")
        state, cfg = loaded.state, loaded.config
        if args.cfg:
            cfg = load_config(args.cfg)
        if cfg is not None:
            from ..modeling.build import build_model

            with torch.device("meta"):  # shapes only: nothing is allocated
                model = build_model(cfg.model)
            own = model.state_dict()
            fit = check_fit(own, state, source=args.src, strict=args.strict)
            print(fit.summary(limit=1000))
            state = {k: v for k, v in state.items() if k in own}
        save_weights(state, args.dst, cfg=cfg, metadata={"source": str(args.src), "source_format": loaded.report.format})
    except (WeightsMismatch, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, WeightsMismatch):
            for name in ("reshaped", "unexpected", "missing"):
                if getattr(exc, name):
                    print(f"all {name} ({len(getattr(exc, name))}):\n  " + "\n  ".join(getattr(exc, name)), file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({len(state)} tensors)")
    return 0

