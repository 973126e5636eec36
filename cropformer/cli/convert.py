"""`cropformer convert` (also `python -m cropformer.convert`): any supported checkpoint to ours.

    cropformer convert SRC DST [--cfg CONFIG] [--strict]

SRC: any supported checkpoint (.pth/.pkl/.bin/.safetensors; see `cropformer.convert`).
DST: `.safetensors` (our names; with --cfg the config goes into its metadata and beside it as `.json`)
or `.pth` (weights only: {"model": state[, "config": dict]}), with the checksum of their content.
Prints the conversion report; with --cfg also checks that the weights fit that model (every missing,
unexpected or reshaped key is listed) and refuses ones that do not, exit status 2. Without --strict a
partial fit is accepted where whole components are absent (backbone-only ImageNet weights, a
Mask2Former checkpoint for CropFormer); keys of components the config lacks are then left out of DST.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UserError, add_common_options, debug_requested


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cropformer convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint to convert")
    p.add_argument("dst", help="output file: .safetensors or .pth")
    p.add_argument("--cfg", help="config file or name: check the weights against it and store it with them")
    p.add_argument("--strict", action="store_true", help="with --cfg: refuse unless every key matches")
    add_common_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..checkpoint import WeightsMismatch, check_fit, read_checkpoint, save_weights
    from ..config import load_config

    p = build_parser()
    args = p.parse_args(argv)
    if not args.dst.endswith((".safetensors", ".pth")):
        p.error(f"DST must end in .safetensors or .pth, got {args.dst!r}")
    src, dst = Path(args.src).resolve(), Path(args.dst).resolve()
    written = [dst, dst.with_suffix(".json")] if dst.suffix == ".safetensors" else [dst]
    if src in written:
        raise UserError(f"{args.dst}: converting would write over the source {args.src}; choose another DST")
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
        try:
            fit = check_fit(own, state, source=args.src, strict=args.strict)
        except WeightsMismatch as exc:
            if debug_requested(argv):
                raise
            print(f"error: {exc}", file=sys.stderr)  # then every key, not only the first few
            for name in ("reshaped", "unexpected", "missing"):
                if getattr(exc, name):
                    print(f"all {name} ({len(getattr(exc, name))}):\n  " + "\n  ".join(getattr(exc, name)), file=sys.stderr)
            return 2
        print(fit.summary(limit=1000))
        state = {k: v for k, v in state.items() if k in own}
    save_weights(state, args.dst, cfg=cfg, metadata={"source": str(args.src), "source_format": loaded.report.format})
    print(f"wrote {args.dst} ({len(state)} tensors)")
    return 0
