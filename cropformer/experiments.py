"""Measures and pictures for experiments beyond AP^e (scripts/hires_effect.py, the crop ensemble's gain).

- `boundary_iou`: Boundary IoU (Cheng et al., CVPR 2021) of two masks: IoU of the parts of each mask
  within `d` pixels of its own contour (the image border counts as contour).
- `entity_quality`: each ground-truth entity's best prediction (highest mask IoU) and the boundary IoU of
  that pair, averaged overall, by COCO size and by the detail set's entity kind; and how many of the
  detail set's twin pairs have one prediction as the best match of both halves (merged).
- `cross_view_agreement`: how well a query's mask in the full view agrees with the same query's mask
  in a corner crop on the crop's footprint (what the ensemble's averaging assumes).
- `mean_se`, `paired_gain`: mean and standard error over seeds.
- `plot_error_bars`: grouped bars with +-1 standard error whiskers (OpenCV; matplotlib is optional).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

# COCO's area ranges (original pixels), as in COCOeval.
SMALL_AREA, MEDIUM_AREA = 32**2, 96**2


def boundary_region(mask: np.ndarray, d: int) -> np.ndarray:
    """H x W bool: pixels of `mask` within `d` px (chessboard distance) of a pixel outside it, the
    outside including everything beyond the image border."""
    m = mask.astype(np.uint8)
    # Eroding with a (2d+1)^2 square equals d erosions with 3 x 3; a zero border makes edges contour.
    eroded = cv2.erode(m, np.ones((2 * d + 1, 2 * d + 1), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (m > 0) & (eroded == 0)


def boundary_iou(a: np.ndarray, b: np.ndarray, d: int) -> float:
    """Boundary IoU of two H x W bool masks with band width `d` px (1.0 when both are empty)."""
    ba, bb = boundary_region(a, d), boundary_region(b, d)
    union = np.logical_or(ba, bb).sum()
    return float(np.logical_and(ba, bb).sum() / union) if union else 1.0


def boundary_width(height: int, width: int, ratio: float) -> int:
    """Band width d = ratio x image diagonal, at least 1 px (Boundary IoU's convention; ratio 0.02 there)."""
    return max(1, int(round(ratio * math.hypot(height, width))))


def _pair_boundary_iou(gt: np.ndarray, pred: np.ndarray, d: int) -> float:
    """boundary_iou on the union's box grown by d + 1 px (the band never reaches further), for speed."""
    ys, xs = np.nonzero(gt | pred)
    y0, x0 = max(0, ys.min() - d - 1), max(0, xs.min() - d - 1)
    y1, x1 = ys.max() + d + 2, xs.max() + d + 2
    # Cutting at the image border keeps the border as contour (the erosion's zero border stands for it).
    return boundary_iou(gt[y0:y1, x0:x1], pred[y0:y1, x0:x1], d)


def entity_quality(gt: dict, predictions: list[dict], *, boundary_ratio: float = 0.005) -> dict:
    """Per ground-truth entity, the prediction of highest mask IoU and the boundary IoU of the pair.

    Args:
        gt: COCO ground truth (images, annotations with RLE segmentation; optional "kind" and "twin"
            (the other half's annotation id) per annotation, as the detail set writes).
        predictions: COCO RLE predictions (image_id, segmentation).
        boundary_ratio: boundary band width as a fraction of the image diagonal.
    Returns {"mIoU", "mBIoU", "count", "by_size": {small|medium|large: {...}}, "by_kind": {...},
    "twins_merged" (percent of twin pairs, nan without twins), "twin_pairs"}, IoUs in percent; an entity
    without an overlapping prediction scores 0 on both.
    """
    preds_by_image: dict[int, list[dict]] = {}
    for p in predictions:
        preds_by_image.setdefault(p["image_id"], []).append(p["segmentation"])
    gts_by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            gts_by_image.setdefault(a["image_id"], []).append(a)
    rows = []  # (mask IoU, boundary IoU, size, kind)
    best_of: dict[int, tuple[int, int]] = {}  # annotation id -> (image id, index of its best prediction)
    for info in gt["images"]:
        anns = gts_by_image.get(info["id"], [])
        if not anns:
            continue
        d = boundary_width(info["height"], info["width"], boundary_ratio)
        dts = preds_by_image.get(info["id"], [])
        gts = [a["segmentation"] for a in anns]
        ious = np.asarray(mask_util.iou(dts, gts, [0] * len(gts))).reshape(len(dts), len(gts)) if dts else None
        for j, a in enumerate(anns):
            area = a.get("area") or float(mask_util.area(a["segmentation"]))
            size = "small" if area < SMALL_AREA else "medium" if area < MEDIUM_AREA else "large"
            best = int(ious[:, j].argmax()) if ious is not None else -1
            if best < 0 or ious[best, j] <= 0:
                rows.append((0.0, 0.0, size, a.get("kind")))
                continue
            best_of[a["id"]] = (info["id"], best)
            g = mask_util.decode(a["segmentation"]).astype(bool)
            p = mask_util.decode(dts[best]).astype(bool)
            rows.append((float(ious[best, j]), _pair_boundary_iou(g, p, d), size, a.get("kind")))

    def summary(sel: list[tuple]) -> dict:
        if not sel:
            return {"mIoU": float("nan"), "mBIoU": float("nan"), "count": 0}
        arr = np.asarray([r[:2] for r in sel], dtype=np.float64)
        return {"mIoU": 100 * float(arr[:, 0].mean()), "mBIoU": 100 * float(arr[:, 1].mean()), "count": len(sel)}

    out = summary(rows)
    out["by_size"] = {s: summary([r for r in rows if r[2] == s]) for s in ("small", "medium", "large")}
    kinds = sorted({r[3] for r in rows if r[3] is not None})
    out["by_kind"] = {k: summary([r for r in rows if r[3] == k]) for k in kinds}
    pairs = {tuple(sorted((a["id"], a["twin"]))) for a in gt["annotations"] if "twin" in a}
    merged = sum(1 for i, j in pairs if i in best_of and best_of.get(i) == best_of.get(j))
    out["twins_merged"] = 100 * merged / len(pairs) if pairs else float("nan")
    out["twin_pairs"] = len(pairs)
    return out


def cross_view_agreement(
    view_logits: torch.Tensor,
    image_sizes: torch.Tensor,
    crop_boxes: torch.Tensor,
    class_scores: torch.Tensor,
    *,
    min_score: float = 0.5,
) -> tuple[float, int]:
    """Agreement of each query's mask between the full view (view 0) and each crop, on the crop.

    Both views' logits are upsampled x4 (bilinear) to their view's pixels, the full view's is sampled
    (bilinear) at the crop view's pixel centres, both are binarised at logit 0 (probability 0.5), and
    the IoU is taken on the crop's footprint. Counted: (crop, query) pairs whose query has class score
    >= min_score and a non-empty mask in either view there.

    Args:
        view_logits: V x Q x h x w mask logits at 1/4 of the padded input (view 0 = the full image).
        image_sizes: V x 2 (h, w) of each view;  crop_boxes: V x 4 (x0, y0, x1, y1) original pixels.
        class_scores: Q.
    Returns (sum of IoUs, number of pairs counted).
    """
    from .ops.paste import STRIDE

    def view_probs(v: int) -> torch.Tensor:  # Q x h_v x w_v logits on the view's own pixels
        h, w = (int(s) for s in image_sizes[v])
        up = F.interpolate(view_logits[v][None].float(), scale_factor=STRIDE, mode="bilinear", align_corners=False)
        return up[0, :, :h, :w]

    keep = class_scores >= min_score
    if not keep.any():
        return 0.0, 0
    full = view_probs(0)[keep]
    X0, Y0, X1, Y1 = (float(c) for c in crop_boxes[0])
    total, count = 0.0, 0
    for v in range(1, view_logits.shape[0]):
        crop = view_probs(v)[keep] > 0
        h, w = crop.shape[1:]
        x0, y0, x1, y1 = (float(c) for c in crop_boxes[v])
        # The crop's pixel centres in original pixels, then in grid_sample's [-1, 1] over the full view.
        xs = x0 + (torch.arange(w, dtype=torch.float32) + 0.5) * (x1 - x0) / w
        ys = y0 + (torch.arange(h, dtype=torch.float32) + 0.5) * (y1 - y0) / h
        gx = 2 * (xs - X0) / (X1 - X0) - 1
        gy = 2 * (ys - Y0) / (Y1 - Y0) - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None].to(full.device)
        on_full = F.grid_sample(full[None], grid, mode="bilinear", align_corners=False)[0] > 0
        inter = (crop & on_full).flatten(1).sum(1)
        union = (crop | on_full).flatten(1).sum(1)
        counted = union > 0
        total += float((inter[counted] / union[counted]).sum())
        count += int(counted.sum())
    return total, count


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); the error is nan for n < 2."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se


def paired_gain(a: Sequence[float], b: Sequence[float]) -> dict:
    """a - b paired by seed: mean, standard error, and whether the mean exceeds two standard errors."""
    diff = [x - y for x, y in zip(a, b)]
    m, se = mean_se(diff)
    return {"mean": m, "se": se, "n": len(diff), "beats_by_2se": bool(np.isfinite(se) and m > 2 * se)}


def plot_error_bars(
    groups: Sequence[str],
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    size: tuple[int, int] = (1000, 520),
) -> None:
    """Grouped bar chart with +-1 standard error whiskers, written as a PNG.

    Args:
        groups: names along the x axis (e.g. metrics).
        series: legend name -> (means per group, standard errors per group); nan errors draw no whisker.
    """
    from .visualize import entity_colors

    W, H = size
    img = np.full((H, W, 3), 255, np.uint8)
    left, right, top, bottom = 60, 200, 40, 50
    means = np.asarray([m for m, _ in series.values()], dtype=np.float64)
    errs = np.nan_to_num(np.asarray([e for _, e in series.values()], dtype=np.float64))
    finite = np.isfinite(means)
    ymax = float(np.max(np.where(finite, means + errs, 0.0), initial=0.0))
    ymax = max(1.0, ymax * 1.1)
    ph = H - top - bottom
    ypix = lambda v: int(round(top + ph * (1 - v / ymax)))  # noqa: E731
    black, grey = (0, 0, 0), (200, 200, 200)
    font = cv2.FONT_HERSHEY_SIMPLEX
    step = 10 ** math.floor(math.log10(ymax / 2))
    for k in range(int(ymax / step) + 1):  # horizontal grid with labels
        y = ypix(k * step)
        cv2.line(img, (left, y), (W - right, y), grey, 1)
        cv2.putText(img, f"{k * step:g}", (5, y + 5), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.line(img, (left, top), (left, H - bottom), black, 1)
    cv2.line(img, (left, H - bottom), (W - right, H - bottom), black, 1)
    colours = entity_colors(len(series))
    gw = (W - left - right) / max(1, len(groups))
    bw = 0.8 * gw / max(1, len(series))
    for g, name in enumerate(groups):
        x_g = left + g * gw + 0.1 * gw
        cv2.putText(img, name, (int(left + (g + 0.3) * gw), H - bottom + 25), font, 0.5, black, 1, cv2.LINE_AA)
        for s in range(len(series)):
            if not finite[s, g]:
                continue
            xa, xb = int(x_g + s * bw), int(x_g + (s + 1) * bw) - 2
            colour = tuple(int(c) for c in colours[s][::-1])  # RGB -> OpenCV's BGR
            cv2.rectangle(img, (xa, ypix(means[s, g])), (xb, ypix(0)), colour, -1)
            if errs[s, g] > 0:
                xm = (xa + xb) // 2
                lo, hi = ypix(means[s, g] - errs[s, g]), ypix(means[s, g] + errs[s, g])
                cv2.line(img, (xm, lo), (xm, hi), black, 1)
                cv2.line(img, (xm - 4, lo), (xm + 4, lo), black, 1)
                cv2.line(img, (xm - 4, hi), (xm + 4, hi), black, 1)
    for s, name in enumerate(series):  # legend
        y = top + 10 + 22 * s
        colour = tuple(int(c) for c in colours[s][::-1])
        cv2.rectangle(img, (W - right + 15, y - 10), (W - right + 30, y + 4), colour, -1)
        cv2.putText(img, name, (W - right + 36, y + 2), font, 0.45, black, 1, cv2.LINE_AA)
    if title:
        cv2.putText(img, title, (left, 25), font, 0.55, black, 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
