"""Mask logits for the paste's tests and benchmarks: test-time view geometry, and elliptic blobs fixed
in image coordinates that every view sees consistently (the maps a trained model produces: strongly
negative away from each entity, views agreeing)."""
from __future__ import annotations

import torch


def corner_views(H: int, W: int, V: int, ratio: float = 0.7):
    """Full view + up to 4 corner crops (x0, y0, x1, y1), as the CropFormer test-time views."""
    cw, ch = int(ratio * W), int(ratio * H)
    crops = [[0, 0, cw, ch], [W - cw, 0, W, ch], [0, H - ch, cw, H], [W - cw, H - ch, W, H]]
    return [[0, 0, W, H]] + crops[: V - 1]


def random_blobs(Q: int, H: int, W: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Q ellipses in an H x W image: centres (cx, cy) and radii (rx, ry), 3-23% of each side."""
    cx, cy = torch.rand(Q, generator=g) * W, torch.rand(Q, generator=g) * H
    rx = (0.03 + 0.2 * torch.rand(Q, generator=g)) * W
    ry = (0.03 + 0.2 * torch.rand(Q, generator=g)) * H
    return cx, cy, rx, ry


def blob_logits(blobs, sizes, boxes, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """V x Q x h x w logits of `random_blobs` as each view sees them: view v (footprint boxes[v] =
    x0, y0, x1, y1 in the image, resized to sizes[v] = rows, cols) at 1/4 of its padded size; 8 at an
    ellipse's centre, 0 on its edge, clamped to [-20, 10], plus N(0, 0.5) noise."""
    cx, cy, rx, ry = blobs
    logits = torch.empty(len(sizes), cx.numel(), h, w)
    for v, ((rows, cols), (x0, y0, x1, y1)) in enumerate(zip(sizes, boxes)):
        yy = (torch.arange(h) * 4 + 2.0) * (y1 - y0) / rows + y0 - 0.5
        xx = (torch.arange(w) * 4 + 2.0) * (x1 - x0) / cols + x0 - 0.5
        d2 = ((xx[None, None] - cx[:, None, None]) / rx[:, None, None]) ** 2 + (
            (yy[None, :, None] - cy[:, None, None]) / ry[:, None, None]
        ) ** 2
        logits[v] = (8 * (1 - d2)).clamp(-20, 10) + 0.5 * torch.randn(cx.numel(), h, w, generator=g)
    return logits


def blob_inputs(V, Q, H, W, seed=0, short=200):
    """(logits, view sizes, view boxes, class scores) of Q blobs in an H x W image, V corner views
    resized to shortest side `short` and padded to a multiple of 32, as the test-time views."""
    g = torch.Generator().manual_seed(seed)
    blobs = random_blobs(Q, H, W, g)
    boxes = corner_views(H, W, V)
    sizes = []
    for x0, y0, x1, y1 in boxes:
        s = short / min(y1 - y0, x1 - x0)
        sizes.append([int((y1 - y0) * s + 0.5), int((x1 - x0) * s + 0.5)])
    h = -(-max(s[0] for s in sizes) // 32) * 8
    w = -(-max(s[1] for s in sizes) // 32) * 8
    return blob_logits(blobs, sizes, boxes, h, w, g), sizes, boxes, torch.rand(Q, generator=g)
