"""Pictures people would rather look at than read: entity overlays and loss curves (OpenCV only)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def entity_colors(n: int, seed: int = 0) -> np.ndarray:
    """n distinct-ish RGB colours (golden-ratio hues, varied saturation/value), n x 3 uint8."""
    if n == 0:
        return np.zeros((0, 3), np.uint8)  # (OpenCV refuses an empty array)
    i = np.arange(n)
    hue = ((i * 0.618033988749895 + seed * 0.1) % 1.0) * 179
    sat = 150 + (i * 37) % 106
    val = 170 + (i * 53) % 86
    hsv = np.stack([hue, sat, val], axis=-1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def boundaries(id_map: np.ndarray) -> np.ndarray:
    """H x W bool: pixels whose right or lower neighbour has a different id (entity borders)."""
    b = np.zeros(id_map.shape, dtype=bool)
    b[:, :-1] |= id_map[:, :-1] != id_map[:, 1:]
    b[:-1, :] |= id_map[:-1, :] != id_map[1:, :]
    return b


def overlay(image_rgb: np.ndarray, id_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Semi-transparent entity colours plus white boundaries over an RGB image; any number of entities.

    id_map: H x W int, 0 = no entity. Returns H x W x 3 uint8 RGB.
    """
    if image_rgb.shape[:2] != id_map.shape:
        raise ValueError(f"image {image_rgb.shape[:2]} and id map {id_map.shape} differ in size")
    n = int(id_map.max()) if id_map.size else 0
    colors = np.concatenate([np.zeros((1, 3), np.uint8), entity_colors(n)], axis=0)
    painted = colors[id_map]
    out = image_rgb.astype(np.float32)
    on = id_map > 0
    out[on] = (1 - alpha) * out[on] + alpha * painted[on]
    out[boundaries(id_map)] = 255.0
    return out.clip(0, 255).astype(np.uint8)


def plot_curves(series: dict[str, list[tuple[int, float]]], path: str | Path, size=(900, 500), log_y: bool = True) -> None:
    """Draw loss curves (iteration, value) to a PNG with axes, ticks and a legend."""
    W, H = size
    img = np.full((H, W, 3), 255, np.uint8)
    left, right, top, bottom = 70, 170, 20, 45
    pts = [(x, y) for s in series.values() for x, y in s if np.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        cv2.imwrite(str(path), img)
        return
    xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    f = np.log10 if log_y else (lambda v: v)
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
    y0, y1 = f(ys.min()), f(ys.max())
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def to_px(x, y):
        px = left + (x - x0) / (x1 - x0) * (W - left - right)
        py = top + (1 - (f(y) - y0) / (y1 - y0)) * (H - top - bottom)
        return int(round(px)), int(round(py))

    cv2.rectangle(img, (left, top), (W - right, H - bottom), (0, 0, 0), 1)
    for t in np.linspace(y0, y1, 5):
        py = int(round(top + (1 - (t - y0) / (y1 - y0)) * (H - top - bottom)))
        label = f"{10 ** t:.3g}" if log_y else f"{t:.3g}"
        cv2.putText(img, label, (5, py + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.line(img, (left, py), (W - right, py), (225, 225, 225), 1)
    for t in np.linspace(x0, x1, 6):
        px = int(round(left + (t - x0) / (x1 - x0) * (W - left - right)))
        cv2.putText(img, f"{int(t)}", (px - 10, H - bottom + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "iteration", (W // 2 - 30, H - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    colors = entity_colors(len(series))
    for i, (name, s) in enumerate(series.items()):
        c = tuple(int(v) for v in colors[i][::-1])  # RGB -> BGR for cv2
        line = [to_px(x, y) for x, y in s if np.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            cv2.polylines(img, [np.array(line, np.int32)], False, c, 2, cv2.LINE_AA)
        cv2.putText(img, name, (W - right + 8, top + 15 + 16 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42, c, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)
