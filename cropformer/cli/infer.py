"""Segment every entity of your images ("segment everything"), in batch.

    python infer.py --ckpt model_final.safetensors --input photos/ --out results/
    python infer.py --ckpt ... --input "photos/*.jpg" --out results/ --device cuda
    python infer.py --ckpt ... --input list.txt --out results/        # one image path per line

For every image NAME it writes into --out:
    NAME.png          entity id map at original resolution (0 = no entity, k = entity k; 16-bit PNG
                      when there are more than 255 entities)
    NAME.json         {"image": path, "height", "width", "entities": [{"id", "score", "area",
                      "bbox" (XYWH), "segmentation" (COCO RLE)}]}
    NAME_overlay.jpg  semi-transparent colours and entity boundaries over the image (longest side capped
                      by --overlay-max-side to keep huge images cheap; 0 = original size)
Images whose three outputs exist are skipped (resume); unreadable images are reported and skipped.
Memory stays bounded on any image size: JPEGs are decoded at reduced resolution when the network needs
fewer pixels, and the fused paste never holds per-query full-resolution maps.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from pathlib import Path

from . import UserError, add_common_options, setup_logging

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_inputs(spec: str) -> list[Path]:
    """A folder (its images, sorted), a glob pattern, a .txt list of paths, or one image file."""
    p = Path(spec)
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS)
    if p.suffix.lower() == ".txt" and p.is_file():
        return [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
    if p.is_file():
        return [p]
    found = sorted(Path(f) for f in glob.glob(spec, recursive=True))
    if not found:
        raise UserError(f"--input {spec!r}: no such folder, file, list or matching images")
    return found


def write_outputs(out: Path, name: str, path: Path, ent, image_rgb, overlay_max_side: int) -> None:
    import cv2
    import numpy as np

    from ..inference import entity_records
    from ..visualize import overlay

    id_map = ent.id_map
    H, W = id_map.shape
    png = id_map.astype(np.uint16 if id_map.max() > 255 else np.uint8)
    if not cv2.imwrite(str(out / f"{name}.png"), png):
        raise OSError(f"cannot write {out / f'{name}.png'}")
    entities = [{"id": k + 1, "score": r["predicted_iou"], "area": r["area"], "bbox": r["bbox"],
                 "segmentation": r["segmentation"]} for k, r in enumerate(entity_records(ent))]
    (out / f"{name}.json").write_text(json.dumps({"image": str(path), "height": H, "width": W, "entities": entities}))
    # Overlay at a capped size: the id map is resized with nearest, the image with area averaging.
    scale = 1.0 if overlay_max_side <= 0 else min(1.0, overlay_max_side / max(H, W))
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    img = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA) if image_rgb.shape[:2] != (size[1], size[0]) else image_rgb
    ids = cv2.resize(id_map, size, interpolation=cv2.INTER_NEAREST) if scale != 1.0 else id_map
    vis = overlay(img, ids)
    cv2.imwrite(str(out / f"{name}_overlay.jpg"), cv2.cvtColor(vis, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cropformer infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="weights: ours or an official checkpoint")
    p.add_argument("--cfg", help="config file or name (needed when the checkpoint stores none)")
    p.add_argument("--input", required=True, help="image folder, glob pattern, .txt list, or one image")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=["full_crops", "full_batch", "full_image", "crops", "single"])
    p.add_argument("--score-mode", choices=["mean_prob", "original"])
    p.add_argument("--min-area", type=int)
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--overlay-max-side", type=int, default=2048)
    p.add_argument("--full-decode", action="store_true", help="decode JPEGs at full resolution (parity path)")
    add_common_options(p)
    return p


def main(argv=None) -> int:
    setup_logging()
    p = build_parser()
    args = p.parse_args(argv)

    from ..config import load_config
    from ..data.decode import ImageDecodeError, decode_image, read_image_info
    from ..inference import Segmenter
    from ..progress import Progress

    log = logging.getLogger("cropformer.infer")
    paths = list_inputs(args.input)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seg = Segmenter.from_checkpoint(args.ckpt, cfg=load_config(args.cfg) if args.cfg else None, device=args.device,
                                    mode=args.mode, score_mode=args.score_mode, min_area=args.min_area,
                                    score_threshold=args.score_threshold)
    bar = Progress(len(paths), "infer")
    done = skipped = failed = 0
    for path in paths:
        name = path.stem
        if all((out / f).exists() for f in (f"{name}.png", f"{name}.json", f"{name}_overlay.jpg")):
            skipped += 1
            bar.update(1)
            continue
        try:
            info = read_image_info(path)
            plan = seg.plan(info.height, info.width)
            decoded = decode_image(path, scale=plan.needed_scale(), reduced=not args.full_decode)
        except ImageDecodeError as exc:
            log.warning("skipping unreadable image: %s", exc)
            failed += 1
            bar.update(1)
            continue
        ent = seg.segment(decoded)
        write_outputs(out, name, path, ent, decoded.image, args.overlay_max_side)
        done += 1
        bar.update(1, entities=len(ent.scores))
    bar.close()
    print(f"{done} segmented, {skipped} already done (skipped), {failed} unreadable -> {out}")
    return 1 if paths and failed == len(paths) else 0  # unreadable images are reported, not fatal

