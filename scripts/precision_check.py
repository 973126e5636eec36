"""What fast mode (bf16) costs on your checkpoint and data, against exact mode (fp32), in one command:

    python scripts/precision_check.py --ckpt model_final.safetensors --data val.json --images val_images/ \
        [--mode full_crops] [--limit 64] [--out precision_check.json]

For each image both modes run on the same decoded input; entities are matched by the query they come from.
Reports AP^e of each mode (and the difference), the mean IoU of matched entities (pixel masks at full
resolution), the number of entities that differ (present in one mode only, or IoU below 0.5), the
share of pixels whose entity id differs, and seconds per image of each mode. Needs hardware with native
bf16 (see `cropformer.inference.bf16_support`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cropformer.cli import UserError, add_common_options, run, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--cfg", help="config file or name (needed when the checkpoint stores none)")
    p.add_argument("--data", required=True, help="COCO-style ground-truth JSON")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--mode", choices=["full_crops", "full_batch", "full_image", "crops", "single"])
    p.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="JSON report (default: print only)")
    add_common_options(p)
    return p


def compare_entities(a, b) -> dict:
    """Entities of one image in two modes (cropformer.inference.Entities), matched by query."""
    qa = {int(q): k + 1 for k, q in enumerate(a.queries)}
    qb = {int(q): k + 1 for k, q in enumerate(b.queries)}
    ious = []
    for q in qa.keys() & qb.keys():
        ma, mb = a.id_map == qa[q], b.id_map == qb[q]
        union = np.count_nonzero(ma | mb)
        ious.append(np.count_nonzero(ma & mb) / union if union else 1.0)
    differ = len(qa.keys() ^ qb.keys()) + sum(iou < 0.5 for iou in ious)
    # id maps number entities by score rank, which may differ: compare the query behind each pixel
    qmap_a = np.concatenate([[-1], a.queries])[a.id_map]
    qmap_b = np.concatenate([[-1], b.queries])[b.id_map]
    return {"ious": ious, "differ": differ, "entities": [len(qa), len(qb)],
            "pixels_differ": float(np.count_nonzero(qmap_a != qmap_b) / qmap_a.size)}


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    from cropformer.config import load_config
    from cropformer.data.decode import decode_image
    from cropformer.evaluation import evaluate_entities, load_ground_truth
    from cropformer.inference import Segmenter, entity_records
    from cropformer.progress import Progress

    gt = load_ground_truth(args.data, need_file_names=True)
    cfg = load_config(args.cfg) if args.cfg else None
    segs = {p: Segmenter.from_checkpoint(args.ckpt, cfg=cfg, device=args.device, mode=args.mode, precision=p)
            for p in ("fp32", "bf16")}
    images = sorted(gt["images"], key=lambda im: im["id"])[: args.limit or None]
    if not images:
        raise UserError(f"{args.data}: no images")
    preds = {p: [] for p in segs}
    seconds = {p: 0.0 for p in segs}
    ious, differ, entities, pixels = [], 0, 0, []
    bar = Progress(len(images), "compare")
    for info in images:
        plan = segs["fp32"].plan(info["height"], info["width"])
        decoded = decode_image(Path(args.images) / info["file_name"], scale=plan.needed_scale(), reduced=False,
                               expected_size=(info["height"], info["width"]))
        ents = {}
        for p, seg in segs.items():
            t0 = time.perf_counter()
            ents[p] = seg.segment(decoded)
            seconds[p] += time.perf_counter() - t0
            preds[p] += [{"image_id": info["id"], "category_id": 1, "segmentation": r["segmentation"],
                          "score": r["predicted_iou"]} for r in entity_records(ents[p])]
        c = compare_entities(ents["fp32"], ents["bf16"])
        ious += c["ious"]
        differ += c["differ"]
        entities += c["entities"][0]
        pixels.append(c["pixels_differ"])
        bar.update(1)
    bar.close()
    ap = {p: evaluate_entities(gt, preds[p], check_annotations=False) for p in segs}
    report = {"checkpoint": args.ckpt, "data": args.data, "images": len(images), "mode": segs["fp32"].mode,
              "AP": {p: {k: ap[p][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")} for p in segs},
              "AP_diff_bf16_minus_fp32": ap["bf16"]["AP"] - ap["fp32"]["AP"],
              "matched_entities": len(ious), "mean_iou": float(np.mean(ious)) if ious else float("nan"),
              "entities_fp32": entities, "entities_differ": int(differ),
              "pixels_differ": float(np.mean(pixels)),
              "s_per_image": {p: seconds[p] / len(images) for p in segs}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
