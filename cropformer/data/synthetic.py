"""Synthetic entity dataset: COCO JSON with compressed RLE masks plus JPEG/PNG images.

Like EntitySeg, every pixel belongs to exactly one entity (masks never overlap and cover the image):
a Voronoi partition of large "stuff" regions, painted over by objects (rotated boxes, ellipses,
convex polygons), small blobs, and thin structures (railings: parallel bars joined by a rail; wires:
long curves). Each entity gets its own colour (chosen far from the colours already used) and one of
three mild textures (noise, stripes, checker) with clear boundaries, so a tiny model can learn it in a
few CPU minutes.

`hi_res=True` (default size 3000 x 4000) keeps thin structures and small blobs at absolute sizes
(wires and bars 1 to 4 px wide, blobs of a few px) instead of scaling them with the image, so they are
only a few pixels wide at full resolution and vanish when the image is shrunk to an 800 px short side:
the case the corner crops exist for.

    python -m cropformer.data.synthetic --out DIR --num-images N --size H W [--hi-res] [--seed S]

writes DIR/annotations.json and DIR/images/. Drawing is numpy/cv2 only: 50 images of 256 x 320 take
about a second on one CPU core here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = ["make_synthetic_image", "labels_to_rles", "make_synthetic_dataset", "main"]


def _pick_colour(rng: np.random.Generator, used: list[np.ndarray]) -> np.ndarray:
    """The farthest (in RGB) of a few random candidates from the colours used so far."""
    cand = rng.integers(30, 226, size=(12, 3)).astype(np.float32)
    if not used:
        return cand[0]
    dist = np.linalg.norm(cand[:, None, :] - np.stack(used)[None], axis=2).min(1)
    return cand[int(dist.argmax())]


def _voronoi(labels: np.ndarray, rng: np.random.Generator, num: int, next_id: int) -> int:
    h, w = labels.shape
    subdiv = cv2.Subdiv2D((0, 0, w, h))
    pts = np.stack([rng.uniform(0, w - 1e-3, num), rng.uniform(0, h - 1e-3, num)], 1)
    subdiv.insert([(float(x), float(y)) for x, y in pts])
    facets, _ = subdiv.getVoronoiFacetList([])
    for facet in facets:
        cv2.fillPoly(labels, [np.round(facet).astype(np.int32)], next_id)
        next_id += 1
    return next_id


def _curve(rng: np.random.Generator, h: int, w: int, n: int = 64) -> np.ndarray:
    """A quadratic Bezier from one image edge to another, as n x 2 int32 points (x, y)."""
    p0 = np.array([0.0, rng.uniform(0, h)]) if rng.random() < 0.5 else np.array([rng.uniform(0, w), 0.0])
    p2 = np.array([w - 1.0, rng.uniform(0, h)]) if rng.random() < 0.5 else np.array([rng.uniform(0, w), h - 1.0])
    p1 = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    t = np.linspace(0, 1, n)[:, None]
    return np.round((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(np.int32)


def make_synthetic_image(
    rng: np.random.Generator, height: int, width: int, *, hi_res: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its entity partition.

    Returns:
        image: H x W x 3 uint8 RGB.
        labels: H x W int32 entity index 0..n-1 (every pixel labelled, every index present).
    """
    h, w = int(height), int(width)
    side = min(h, w)
    labels = np.zeros((h, w), np.uint16)  # cv2 draws into 16-bit single-channel images
    nid = _voronoi(labels, rng, int(rng.integers(4, 9)), 0)
    # Objects: rotated boxes, ellipses, convex polygons; 4% to 30% of the short side.
    for _ in range(int(rng.integers(8, 16))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        a, b = rng.uniform(0.04, 0.3, 2) * side
        kind = rng.integers(3)
        if kind == 0:
            box = cv2.boxPoints(((cx, cy), (a, b), float(rng.uniform(0, 180))))
            cv2.fillPoly(labels, [np.round(box).astype(np.int32)], nid)
        elif kind == 1:
            cv2.ellipse(labels, (int(cx), int(cy)), (max(1, int(a / 2)), max(1, int(b / 2))),
                        float(rng.uniform(0, 180)), 0, 360, nid, -1)
        else:
            pts = np.stack([cx + rng.uniform(-a, a, 7), cy + rng.uniform(-b, b, 7)], 1).astype(np.int32)
            cv2.fillPoly(labels, [cv2.convexHull(pts)], nid)
        nid += 1
    # Thin structures: widths in absolute pixels at high resolution, relative to the image otherwise.
    def thin() -> int:
        if hi_res:
            return int(rng.integers(1, 5))
        return max(2, int(round(side * rng.uniform(0.008, 0.02))))

    for _ in range(int(rng.integers(1, 3))):  # railings: bars + rail, one entity
        t = thin()
        x0, x1 = sorted(rng.uniform(0, w, 2))
        x1 = max(x1, x0 + 0.2 * w)
        y_top = rng.uniform(0.2, 0.7) * h
        y_bot = min(h - 1, y_top + rng.uniform(0.1, 0.3) * h)
        cv2.line(labels, (int(x0), int(y_top)), (int(x1), int(y_top)), nid, t, cv2.LINE_8)
        gap = max(3 * t + 2, (x1 - x0) / rng.integers(5, 15))
        for x in np.arange(x0, x1, gap):
            cv2.line(labels, (int(x), int(y_top)), (int(x), int(y_bot)), nid, t, cv2.LINE_8)
        nid += 1
    for _ in range(int(rng.integers(1, 4))):  # wires
        cv2.polylines(labels, [_curve(rng, h, w)], False, nid, thin(), cv2.LINE_8)
        nid += 1
    # Small entities: blobs of a few px (radius 2-6 px, or up to 2% of the short side at low res).
    rmax = 6 if hi_res else max(3, int(0.02 * side))
    for _ in range(int(rng.integers(3, 10))):
        cv2.circle(labels, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), int(rng.integers(2, rmax + 1)),
                   nid, -1, cv2.LINE_8)
        nid += 1
    # Drop entities painted over entirely; renumber 0..n-1 in painting order.
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=nid))
    remap = np.zeros(nid, np.int32)
    remap[present] = np.arange(present.size, dtype=np.int32)
    labels = remap[labels]
    n = present.size

    used: list[np.ndarray] = []
    for _ in range(n):
        used.append(_pick_colour(rng, used))
    colours = np.stack(used).astype(np.int16)  # n x 3, in [30, 225]
    # Texture (amplitude <= 16) plus noise (clipped to +-9) stays within [0, 255] for those colours, so
    # no clipping pass over the full image is needed.
    kind = rng.integers(0, 3, size=n)
    amp = (rng.uniform(6, 16, size=n) * (kind > 0)).astype(np.float32)
    freq = (2 * math.pi / (rng.uniform(0.02, 0.06, size=n) * side)).astype(np.float32)
    yy, xx = np.ogrid[0:h, 0:w]
    f = freq[labels]
    stripes = np.sin((xx + np.float32(0.5) * yy).astype(np.float32) * f)
    # checker of period 2*pi/f: sign of the product of two square waves
    checker = np.sign(np.sin(xx.astype(np.float32) * f) * np.sin(yy.astype(np.float32) * f))
    offset = np.where((kind == 1)[labels], stripes, checker) * amp[labels]
    offset += np.clip(rng.standard_normal((h, w), dtype=np.float32) * 3.0, -9.0, 9.0)
    image = colours[labels] + np.rint(offset).astype(np.int16)[:, :, None]
    return image.astype(np.uint8), labels


def labels_to_rles(labels: np.ndarray) -> list[dict]:
    """Compressed COCO RLE of each entity of an H x W int label map (index 0..n-1), in index order.

    Runs are found once over the column-major label map instead of encoding n full masks.
    """
    h, w = labels.shape
    flat = np.ascontiguousarray(labels.T).ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, flat.size))
    values = flat[starts]
    order = np.argsort(values, kind="stable")
    bounds = np.searchsorted(values[order], np.arange(int(labels.max()) + 2))
    rles = []
    for i in range(bounds.size - 1):
        idx = order[bounds[i]:bounds[i + 1]]
        s, ln = starts[idx], lengths[idx]
        gaps = s - np.concatenate(([0], s[:-1] + ln[:-1]))
        counts = np.empty(2 * s.size + 1, np.int64)
        counts[0:-1:2], counts[1::2] = gaps, ln
        counts[-1] = flat.size - (s[-1] + ln[-1]) if s.size else flat.size
        rle = mask_util.frPyObjects({"counts": counts.tolist(), "size": [h, w]}, h, w)
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


def make_synthetic_dataset(
    out: str | os.PathLike,
    num_images: int,
    size: tuple[int, int] | None = None,
    hi_res: bool = False,
    seed: int = 0,
    image_format: str = "jpg",
) -> Path:
    """Write `num_images` synthetic images and `annotations.json` under `out`; returns the JSON path.

    Args:
        size: (H, W); default (256, 320), or (3000, 4000) with `hi_res`.
        image_format: "jpg" (quality 95) or "png".
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    height, width = size if size is not None else ((3000, 4000) if hi_res else (256, 320))
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    for i in range(num_images):
        image, labels = make_synthetic_image(rng, height, width, hi_res=hi_res)
        name = f"{i:06d}.{image_format}"
        if not cv2.imwrite(str(out / "images" / name), image[:, :, ::-1], params):
            raise OSError(f"could not write {out / 'images' / name}")
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        for rle in labels_to_rles(labels):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": rle,
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
            })
    path = out / "annotations.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({
        "info": {"description": f"synthetic entities, seed {seed}, hi_res {hi_res}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "entity"}],
    }))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (annotations.json, images/)")
    ap.add_argument("--num-images", type=int, default=50)
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="image size; default 256 320, or 3000 4000 with --hi-res")
    ap.add_argument("--hi-res", action="store_true", help="thin structures of 1-4 px at full resolution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg")
    args = ap.parse_args(argv)
    path = make_synthetic_dataset(args.out, args.num_images, tuple(args.size) if args.size else None,
                                  hi_res=args.hi_res, seed=args.seed, image_format=args.format)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
