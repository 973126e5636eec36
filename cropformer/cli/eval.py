"""Evaluate AP^e (class-agnostic COCO segm AP, SPEC.md section 6) of a checkpoint on a COCO-style set.

    python eval.py --ckpt output/tiny/model_final.safetensors --data val.json --images DIR [--mode full_crops]
    python eval.py --data val.json --preds predictions.json        # score an existing predictions file
    torchrun --nproc_per_node N eval.py --ckpt ... --data ... --images ...   # images sharded over ranks

Prints the AP table and per-image time; writes <out>/metrics.json and <out>/predictions.json (COCO RLE).
The ground truth and a --preds file are validated before anything runs (see cropformer/evaluation.py):
a malformed file is one line naming the file, the record and the problem, exit status 2. An image that
fails (unreadable, truncated, size not as annotated, out of memory, a model error) is skipped and listed
under "failed" in metrics.json with its stage and reason; the AP is still printed, and the exit status
is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import add_common_options, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cropformer eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="weights: ours (.safetensors / training .pth) or an official checkpoint")
    p.add_argument("--cfg", help="config file or name (needed when the checkpoint stores none)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides (of --cfg, or of the checkpoint's config), e.g. input.crop_sample_num_test=2")
    p.add_argument("--data", required=True, help="COCO-style ground-truth JSON")
    p.add_argument("--images", help="image folder (file_name in the JSON is relative to it)")
    p.add_argument("--preds", help="evaluate this COCO RLE predictions file instead of running a model")
    p.add_argument("--mode", choices=["full_crops", "full_batch", "full_image", "crops", "single"])
    p.add_argument("--score-mode", choices=["mean_prob", "original"])
    p.add_argument("--min-area", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32: exact (the original's outputs); bf16: fast mode where the hardware computes "
                        "bfloat16 natively (AVX512-BF16/AMX CPUs, recent GPUs), refused elsewhere")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--reduced-decode", action="store_true",
                   help="decode big JPEGs at reduced resolution (faster; default is the full decode the released numbers need)")
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint or predictions)")
    add_common_options(p)
    return p


def main(argv=None) -> int:
    setup_logging()
    p = build_parser()
    args = p.parse_args(argv)

    from .. import distributed as dist_utils
    from ..checkpoint import atomic_write
    from ..evaluation import evaluate_entities, format_table, load_ground_truth, predict_dataset, read_json

    gt = load_ground_truth(args.data, need_file_names=not args.preds)
    if args.preds:
        preds = read_json(args.preds, "predictions")
        out = Path(args.out or Path(args.preds).parent)
        stats = {}
    else:
        if not args.ckpt or not args.images:
            p.error("--ckpt and --images are needed unless --preds is given")
        import torch

        from ..config import load_config
        from ..inference import Segmenter

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rank, _, local_rank = dist_utils.init_distributed(device)
        if device == "cuda":
            device = f"cuda:{local_rank}"
        cfg = load_config(args.cfg) if args.cfg else None
        seg = Segmenter.from_checkpoint(args.ckpt, cfg=cfg, overrides=args.set, device=device, mode=args.mode,
                                        score_mode=args.score_mode, min_area=args.min_area, precision=args.precision)
        preds, stats = predict_dataset(seg, gt, args.images, reduced_decode=args.reduced_decode)
        out = Path(args.out or Path(args.ckpt).parent / "eval")
    if dist_utils.get_rank() != 0:
        dist_utils.cleanup()  # waits at the barrier until rank 0 has scored and written everything
        return 0
    metrics = evaluate_entities(gt, preds, predictions_source=args.preds or "predictions", check_annotations=False)
    out.mkdir(parents=True, exist_ok=True)
    print(format_table(metrics))
    failed = stats.get("failed", [])
    if stats:
        print(f"{stats['images']} images, {stats['mean_s_per_image']:.3f} s/image"
              + (f", peak GPU memory {stats['peak_mem_mb']:.0f} MB" if "peak_mem_mb" in stats else ""))
        atomic_write(out / "predictions.json", lambda tmp: Path(tmp).write_text(json.dumps(preds)))
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps({"metrics": metrics, **stats}, indent=1)))
    print(f"wrote {out / 'metrics.json'}")
    if failed:
        print(f"{len(failed)} of {stats['images']} images failed and were not scored (AP counts them as missed), "
              f"e.g. {failed[0]['path']}: {failed[0]['stage']}: {failed[0]['reason']}; all listed under 'failed' "
              f"in {out / 'metrics.json'}", file=sys.stderr)
    dist_utils.cleanup()
    return 1 if failed else 0

