"""Resize rules shared by every view: detectron2's shortest-edge sizes, PIL bilinear for images and
PIL nearest for masks.

The original resizes uint8 images with PIL `Image.resize(..., BILINEAR)` (antialiased when shrinking)
and masks with PIL `NEAREST`; both are reproduced here with PIL itself, so the full view and the crops
match the original bit for bit when the image is decoded at full resolution (checked against
`reference/golden_tiny/inputs.pt` in tests/data/test_views.py).

PIL's NEAREST is not `floor((i + 0.5) * in / out)` for every size (it uses fixed-point arithmetic;
the float formula differs for e.g. 15000 -> 7), so `nearest_indices` asks PIL for the index map itself.
The map is separable (the resize is an axis-aligned affine map), which lets masks be sampled straight
from their RLE at the output grid without decoding them at full resolution.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

__all__ = ["resized_size", "nearest_indices", "resize_bilinear"]


def resized_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) of detectron2's ResizeShortestEdge for one chosen short side.

    scale = short_side / min(h, w); the longer side is then capped at `max_size`; both sides are
    rounded with int(x + 0.5). Computed in Python floats exactly as the original.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    scale = short_side * 1.0 / min(height, width)
    if height < width:
        newh, neww = float(short_side), scale * width
    else:
        newh, neww = scale * height, float(short_side)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


@lru_cache(maxsize=4096)
def _nearest_indices_cached(in_size: int, out_size: int) -> np.ndarray:
    # A 1-row int32 image holding its own column indices, resized by PIL: the result is PIL's map.
    ramp = np.arange(in_size, dtype=np.int32)[None, :]
    mapped = np.asarray(Image.fromarray(ramp).resize((out_size, 1), Image.NEAREST))[0]
    out = mapped.astype(np.int64)
    out.setflags(write=False)
    return out


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel along one axis under PIL NEAREST resizing.

    Returns an int64 array of length `out_size` with values in [0, in_size), non-decreasing.
    `resized[y, x] == src[rows[y], cols[x]]` with rows = nearest_indices(H, h), cols =
    nearest_indices(W, w) equals `Image.fromarray(src).resize((w, h), NEAREST)` exactly.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    return _nearest_indices_cached(int(in_size), int(out_size))


def resize_bilinear(
    image: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """PIL BILINEAR resize of an H x W x 3 uint8 image to `size` = (h, w).

    `box` (x0, y0, x1, y1, float, in input pixels) resizes only that region (PIL's `box` argument);
    None means the whole image. Antialiased when shrinking, as PIL does (support grows with the scale).
    Returns a new h x w x 3 uint8 array.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.dtype} {image.shape}")
    h, w = size
    pil = Image.fromarray(np.ascontiguousarray(image))
    if box is None and (h, w) == image.shape[:2]:
        return np.array(pil)  # PIL's resize to the same size is a plain copy
    return np.array(pil.resize((int(w), int(h)), Image.BILINEAR, box=box))
