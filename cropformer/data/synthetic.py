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

The detail set (`make_detail_image`, `--detail SHORT_SIDE`) is built for the crop-ensemble experiment
(scripts/hires_effect.py): its fine detail (gaps between look-alike twins, thin structures, small discs)
is sized in mask cells of the views at a given test short side (`DetailSpec.for_views`), by default
under one cell of the full view and at least one cell of a corner crop.

    python -m cropformer.data.synthetic --out DIR --num-images N --size H W [--hi-res | --detail S] [--seed S]

writes DIR/annotations.json and DIR/images/. Drawing is numpy/cv2 only: 50 images of 256 x 320 take
about a second on one CPU core here.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = ["make_synthetic_image", "make_detail_image", "DetailSpec", "DETAIL_KINDS", "view_cells", "labels_to_rles",
           "make_synthetic_dataset", "main"]


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
    labels, _ = _renumber(labels, nid)
    return _paint(rng, labels), labels


def _renumber(labels: np.ndarray, nid: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop entities painted over entirely and renumber 0..n-1 in painting order.

    Returns the int32 label map and the map from drawn id to new index (-1 where dropped)."""
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=nid))
    remap = np.full(nid, -1, np.int32)
    remap[present] = np.arange(present.size, dtype=np.int32)
    return remap[labels], remap


def _paint(rng: np.random.Generator, labels: np.ndarray, twin_of: np.ndarray | None = None) -> np.ndarray:
    """H x W x 3 uint8 RGB of an entity partition: one colour and one texture per entity.

    twin_of: optional n int array; entity i takes the appearance of entity twin_of[i] (itself by
    default), so twins differ only by where they are.
    """
    h, w = labels.shape
    side = min(h, w)
    n = int(labels.max()) + 1
    used: list[np.ndarray] = []
    for _ in range(n):
        used.append(_pick_colour(rng, used))
    colours = np.stack(used).astype(np.int16)  # n x 3, in [30, 225]
    # Texture (amplitude <= 16) plus noise (clipped to +-9) stays within [0, 255] for those colours, so
    # no clipping pass over the full image is needed.
    kind = rng.integers(0, 3, size=n)
    amp = (rng.uniform(6, 16, size=n) * (kind > 0)).astype(np.float32)
    freq = (2 * math.pi / (rng.uniform(0.02, 0.06, size=n) * side)).astype(np.float32)
    if twin_of is not None:
        colours, kind, amp, freq = colours[twin_of], kind[twin_of], amp[twin_of], freq[twin_of]
    yy, xx = np.ogrid[0:h, 0:w]
    f = freq[labels]
    stripes = np.sin((xx + np.float32(0.5) * yy).astype(np.float32) * f)
    # checker of period 2*pi/f: sign of the product of two square waves
    checker = np.sign(np.sin(xx.astype(np.float32) * f) * np.sin(yy.astype(np.float32) * f))
    offset = np.where((kind == 1)[labels], stripes, checker) * amp[labels]
    offset += np.clip(rng.standard_normal((h, w), dtype=np.float32) * 3.0, -9.0, 9.0)
    image = colours[labels] + np.rint(offset).astype(np.int16)[:, :, None]
    return image.astype(np.uint8)


def view_cells(height: int, width: int, *, short_side: int, max_size: int = 1333,
               crop_ratio: float = 0.7) -> tuple[float, float]:
    """Size, in original pixels, of one mask-logit cell (stride 4 of the network input) of the full
    view and of a corner crop at this test size: (full_cell, crop_cell). crop_cell ~ crop_ratio x full_cell."""
    from ..ops.paste import STRIDE
    from .views import plan_views

    full, crop = plan_views(height, width, short_side=short_side, max_size=max_size, corners=(0,),
                            ratio=crop_ratio).views
    return STRIDE / min(full.scale), STRIDE / min(crop.scale)


@dataclass(frozen=True)
class DetailSpec:
    """Sizes, in original pixels, of the fine detail of the detail set (`make_detail_image`).

    gap_px: range of the gap between twin entities and of the width of thin structures.
    blob_px: range of the diameter of small entities.
    """

    gap_px: tuple[float, float]
    blob_px: tuple[float, float]

    @classmethod
    def for_views(cls, height: int, width: int, *, short_side: int, max_size: int = 1333,
                  crop_ratio: float = 0.7, gap_cells: tuple[float, float] | None = None,
                  blob_cells: tuple[float, float] = (1.0, 2.0)) -> DetailSpec:
        """Detail sized in full-view mask cells at this test size. The default gap band, from one crop
        cell to one full-view cell (crop_ratio to 1 full-view cells), is what the crops resolve and the
        full view does not."""
        full_cell, crop_cell = view_cells(height, width, short_side=short_side, max_size=max_size, crop_ratio=crop_ratio)
        gap = (crop_cell, full_cell) if gap_cells is None else (gap_cells[0] * full_cell, gap_cells[1] * full_cell)
        return cls(gap, (blob_cells[0] * full_cell, blob_cells[1] * full_cell))


DETAIL_KINDS = ("stuff", "object", "twin", "thin", "small")


def make_detail_image(
    rng: np.random.Generator, height: int, width: int, spec: DetailSpec
) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[int, int]]]:
    """One image of the detail set: fine detail decides the masks (the crop-ensemble experiment).

    Voronoi stuff, a few large objects, then the detail: twin pairs (a box or ellipse cut in two by a
    straight gap of `spec.gap_px` showing what lies beneath; both halves share colour and texture, so
    only the gap separates them), thin railings and wires `spec.gap_px` wide, and small discs of
    diameter `spec.blob_px`.

    Returns:
        image: H x W x 3 uint8 RGB.
        labels: H x W int32 entity index 0..n-1 (every pixel labelled, every index present).
        kinds: n strings from DETAIL_KINDS.
        twins: (i, j) entity indices of each twin pair of which both halves remain.
    """
    h, w = int(height), int(width)
    side = min(h, w)
    labels = np.zeros((h, w), np.uint16)
    kinds: list[str] = []
    twins: list[tuple[int, int]] = []

    def gap() -> float:
        return float(rng.uniform(*spec.gap_px))

    nid = _voronoi(labels, rng, int(rng.integers(3, 7)), 0)
    kinds += ["stuff"] * nid
    for _ in range(int(rng.integers(3, 7))):  # large objects: 15% to 35% of the short side
        cv2.ellipse(labels, (int(rng.uniform(0, w)), int(rng.uniform(0, h))),
                    tuple(int(v) for v in rng.uniform(0.075, 0.175, 2) * side), float(rng.uniform(0, 180)),
                    0, 360, nid, -1)
        kinds.append("object")
        nid += 1
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(3, 7))):  # twin pairs: 12% to 25% of the short side
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        a, b = rng.uniform(0.12, 0.25, 2) * side
        shape = np.zeros((h, w), np.uint8)
        if rng.random() < 0.5:
            box = cv2.boxPoints(((cx, cy), (a, b), float(rng.uniform(0, 180))))
            cv2.fillPoly(shape, [np.round(box).astype(np.int32)], 1)
        else:
            cv2.ellipse(shape, (int(cx), int(cy)), (int(a / 2), int(b / 2)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        theta = rng.uniform(0, math.pi)
        dist = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)  # signed distance to the cut
        half = gap() / 2
        labels[(shape > 0) & (dist < -half)] = nid
        labels[(shape > 0) & (dist > half)] = nid + 1
        kinds += ["twin", "twin"]
        twins.append((nid, nid + 1))
        nid += 2
    for _ in range(int(rng.integers(1, 3))):  # railings: bars + rail, one entity
        t = max(1, round(gap()))
        x0 = rng.uniform(0, 0.6) * w
        x1 = x0 + rng.uniform(0.2, 0.4) * w
        y_top = rng.uniform(0.2, 0.7) * h
        y_bot = min(h - 1, y_top + rng.uniform(0.1, 0.25) * h)
        cv2.line(labels, (int(x0), int(y_top)), (int(x1), int(y_top)), nid, t, cv2.LINE_8)
        for x in np.arange(x0, x1, max(4 * t, (x1 - x0) / rng.integers(4, 9))):
            cv2.line(labels, (int(x), int(y_top)), (int(x), int(y_bot)), nid, t, cv2.LINE_8)
        kinds.append("thin")
        nid += 1
    for _ in range(int(rng.integers(1, 3))):  # wires
        cv2.polylines(labels, [_curve(rng, h, w)], False, nid, max(1, round(gap())), cv2.LINE_8)
        kinds.append("thin")
        nid += 1
    for _ in range(int(rng.integers(6, 13))):  # small discs
        r = rng.uniform(*spec.blob_px) / 2
        cv2.circle(labels, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), max(1, round(r)), nid, -1, cv2.LINE_8)
        kinds.append("small")
        nid += 1
    labels, remap = _renumber(labels, nid)
    twins = [(int(remap[i]), int(remap[j])) for i, j in twins if remap[i] >= 0 and remap[j] >= 0]
    twin_of = np.arange(int(labels.max()) + 1)
    for i, j in twins:
        twin_of[j] = i
    kinds = [k for k, r in zip(kinds, remap) if r >= 0]
    return _paint(rng, labels, twin_of), labels, kinds, twins


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
    detail: DetailSpec | None = None,
) -> Path:
    """Write `num_images` synthetic images and `annotations.json` under `out`; returns the JSON path.

    Args:
        size: (H, W); default (256, 320), or (3000, 4000) with `hi_res` or `detail`.
        image_format: "jpg" (quality 95) or "png".
        detail: draw the detail set (`make_detail_image`) with these sizes instead of the default set;
            each annotation then has a "kind" (one of DETAIL_KINDS), and each twin the annotation id
            of its other half as "twin".
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    height, width = size if size is not None else ((3000, 4000) if hi_res or detail else (256, 320))
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    for i in range(num_images):
        if detail is None:
            image, labels = make_synthetic_image(rng, height, width, hi_res=hi_res)
            kinds, partner = None, {}
        else:
            image, labels, kinds, twins = make_detail_image(rng, height, width, detail)
            partner = {**dict(twins), **{j: i for i, j in twins}}
        name = f"{i:06d}.{image_format}"
        if not cv2.imwrite(str(out / "images" / name), image[:, :, ::-1], params):
            raise OSError(f"could not write {out / 'images' / name}")
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        first_id = len(annotations) + 1  # entity k's annotation id is first_id + k
        for k, rle in enumerate(labels_to_rles(labels)):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": rle,
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                **({"kind": kinds[k]} if kinds else {}),
                **({"twin": first_id + partner[k]} if k in partner else {}),
            })
    path = out / "annotations.json"
    tmp = path.with_suffix(".json.tmp")
    info = {"description": f"synthetic entities, seed {seed}, hi_res {hi_res}"}
    if detail is not None:
        info = {"description": f"synthetic detail set, seed {seed}", "detail": asdict(detail)}
    tmp.write_text(json.dumps({
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "entity"}],
    }))
    os.replace(tmp, path)
    return path


if __name__ == "__main__":  # `python -m cropformer.data.synthetic` = `cropformer synthetic`
    import sys

    from ..cli import run
    from ..cli.synthetic import main

    sys.exit(run(main))
