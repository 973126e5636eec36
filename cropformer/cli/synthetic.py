"""`cropformer synthetic` (also `python -m cropformer.data.synthetic`): a synthetic entity dataset
(COCO JSON with RLE masks + images), the demo's data and the crop-ensemble experiment's detail set."""
from __future__ import annotations

import argparse

from ..data.synthetic import DetailSpec, make_synthetic_dataset
from . import add_common_options


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cropformer synthetic", description=__doc__)
    ap.add_argument("--out", required=True, help="output folder (annotations.json, images/)")
    ap.add_argument("--num-images", type=int, default=50)
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="image size; default 256 320, or 3000 4000 with --hi-res or --detail")
    ap.add_argument("--hi-res", action="store_true", help="thin structures of 1-4 px at full resolution")
    ap.add_argument("--detail", type=int, metavar="SHORT_SIDE", default=None,
                    help="the detail set (twins, thin structures, small discs) sized for views at this test short side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg")
    add_common_options(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    size = tuple(args.size) if args.size else None
    detail = None
    if args.detail is not None:
        detail = DetailSpec.for_views(*(size or (3000, 4000)), short_side=args.detail)
    path = make_synthetic_dataset(args.out, args.num_images, size, hi_res=args.hi_res, seed=args.seed,
                                  image_format=args.format, detail=detail)
    print(f"wrote {path}")
    return 0
