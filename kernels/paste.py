"""Fused multi-view paste of entity masks in Triton (GPU; CPU under TRITON_INTERPRET=1).

Semantics are those of `cropformer.ops.paste.paste_entities_ref`; the geometry (3 low-res taps per
output row and column and view, tile edges that include every footprint edge, queries in descending
class score) comes from `cropformer.ops.paste._plan`, the same as for the C++ and CUDA kernels.

1. `_paste_bounds_kernel`: one program per (tile, block of ranks). For each query it takes the minimum
   and maximum low-res logit over the tile's support in every view covering the tile; since each
   view's logit at a pixel is a convex combination of those taps, the mean of the sigmoids of the
   minima / maxima bound the fused probability over the tile. It writes flags[tile, rank]:
   1 = can be on somewhere in the tile, 2 = on everywhere in it.
2. The launcher turns the flags into each tile's survivor list in rank order, cut after the first
   query that is on everywhere (torch ops on the device; tiles x Q int32).
3. `_paste_pixels_kernel`: one program per tile (TILE x TILE pixels). It walks the survivors in rank
   order; each step evaluates the fused probability of one query at the tile's undecided pixels, gives
   them the query where it exceeds the threshold, and adds the query's score terms and area with one
   atomic per step. It stops when every pixel is decided or the list ends.

Launches run on the device of the logits (`cuda_device_guard`), not on the current device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cropformer.ops._dispatch import cuda_device_guard

BOUND_MARGIN = 1e-4  # as kBoundMargin in csrc/paste/paste.h
TILE = 32
BLOCK_RANKS = 32


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _paste_bounds_kernel(
    logits_ptr, row_idx_ptr, col_idx_ptr, boxes_ptr, tiles_ptr, order_ptr, flags_ptr,
    V, Q, h, w, H, W, thr_lo, thr_hi,
    BLOCK: tl.constexpr,
):
    """flags[t, r] for the queries of ranks r in this program's block (see the module docstring)."""
    t = tl.program_id(0)
    ranks = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = ranks < Q
    q = tl.load(order_ptr + ranks, mask=valid, other=0).to(tl.int64)
    ya = tl.load(tiles_ptr + 4 * t)
    yb = tl.load(tiles_ptr + 4 * t + 1)
    xa = tl.load(tiles_ptr + 4 * t + 2)
    xb = tl.load(tiles_ptr + 4 * t + 3)
    lo = tl.zeros([BLOCK], dtype=tl.float32)
    hi = tl.zeros([BLOCK], dtype=tl.float32)
    nv = 0
    for v in range(V):
        covers = (tl.load(boxes_ptr + 4 * v) <= xa) & (xb <= tl.load(boxes_ptr + 4 * v + 2)) & \
                 (tl.load(boxes_ptr + 4 * v + 1) <= ya) & (yb <= tl.load(boxes_ptr + 4 * v + 3))
        if covers:
            r0 = tl.load(row_idx_ptr + (v * H + ya) * 3)
            r1 = tl.load(row_idx_ptr + (v * H + yb - 1) * 3 + 2)
            c0 = tl.load(col_idx_ptr + (v * W + xa) * 3)
            c1 = tl.load(col_idx_ptr + (v * W + xb - 1) * 3 + 2)
            base = logits_ptr + (v * Q + q) * h * w
            mn = tl.full([BLOCK], float("inf"), tl.float32)
            mx = tl.full([BLOCK], float("-inf"), tl.float32)
            for r in range(r0, r1 + 1):
                for c in range(c0, c1 + 1):
                    val = tl.load(base + r * w + c, mask=valid, other=0.0)
                    mn = tl.minimum(mn, val)
                    mx = tl.maximum(mx, val)
            lo += _sigmoid(mn)
            hi += _sigmoid(mx)
            nv += 1
    n = tl.maximum(nv, 1).to(tl.float32)
    flags = tl.where(hi / n > thr_lo, 1, 0) | tl.where(lo / n > thr_hi, 2, 0)
    flags = tl.where(nv > 0, flags, 0)
    tl.store(flags_ptr + t.to(tl.int64) * Q + ranks, flags.to(tl.int8), mask=valid)


@triton.jit
def _paste_pixels_kernel(
    logits_ptr, row_idx_ptr, row_w_ptr, col_idx_ptr, col_w_ptr, boxes_ptr, tiles_ptr,
    survivors_ptr, n_survivors_ptr, out_ptr, prob_sum_ptr, area_ptr, evaluated_ptr,
    V, Q, h, w, H, W, thr,
    SCORE_MODE: tl.constexpr, TILE_SIDE: tl.constexpr,
):
    """Id map, per-query score sums and areas over one tile (see the module docstring)."""
    t = tl.program_id(0)
    ya = tl.load(tiles_ptr + 4 * t)
    yb = tl.load(tiles_ptr + 4 * t + 1)
    xa = tl.load(tiles_ptr + 4 * t + 2)
    xb = tl.load(tiles_ptr + 4 * t + 3)
    offs = tl.arange(0, TILE_SIDE * TILE_SIDE)
    y = ya + offs // TILE_SIDE
    x = xa + offs % TILE_SIDE
    inside = (y < yb) & (x < xb)
    ns = tl.load(n_survivors_ptr + t)
    ids = tl.zeros([TILE_SIDE * TILE_SIDE], dtype=tl.int32)
    undecided = inside
    remaining = tl.sum(undecided.to(tl.int32))
    evaluated = remaining * 0
    s = 0
    while (s < ns) & (remaining > 0):
        q = tl.load(survivors_ptr + t.to(tl.int64) * Q + s).to(tl.int64)
        total = tl.zeros([TILE_SIDE * TILE_SIDE], dtype=tl.float32)
        nv = 0
        for v in range(V):
            covers = (tl.load(boxes_ptr + 4 * v) <= xa) & (xb <= tl.load(boxes_ptr + 4 * v + 2)) & \
                     (tl.load(boxes_ptr + 4 * v + 1) <= ya) & (yb <= tl.load(boxes_ptr + 4 * v + 3))
            if covers:
                base = logits_ptr + (v * Q + q) * h * w
                rt = (v * H + y) * 3
                ct = (v * W + x) * 3
                acc = tl.zeros([TILE_SIDE * TILE_SIDE], dtype=tl.float32)
                for i in tl.static_range(3):
                    ri = tl.load(row_idx_ptr + rt + i, mask=undecided, other=0)
                    rw = tl.load(row_w_ptr + rt + i, mask=undecided, other=0.0)
                    line = tl.zeros([TILE_SIDE * TILE_SIDE], dtype=tl.float32)
                    for j in tl.static_range(3):
                        cj = tl.load(col_idx_ptr + ct + j, mask=undecided, other=0)
                        cwj = tl.load(col_w_ptr + ct + j, mask=undecided, other=0.0)
                        line += cwj * tl.load(base + ri * w + cj, mask=undecided, other=0.0)
                    acc += rw * line
                total += _sigmoid(acc)
                nv += 1
        p = total / nv
        on = undecided & (p > thr)
        ids = tl.where(on, (q + 1).to(tl.int32), ids)
        if SCORE_MODE == 1:
            term = _sigmoid(p)
        else:
            term = p
        n_on = tl.sum(on.to(tl.int32))
        if n_on > 0:
            tl.atomic_add(prob_sum_ptr + q, tl.sum(tl.where(on, term, 0.0)).to(tl.float64))
            tl.atomic_add(area_ptr + q, n_on.to(tl.int64))
        evaluated += remaining
        undecided = undecided & ~on
        remaining = tl.sum(undecided.to(tl.int32))
        s += 1
    tl.store(out_ptr + y.to(tl.int64) * W + x, ids, mask=inside)
    tl.atomic_add(evaluated_ptr, evaluated.to(tl.int64))


def paste_entities_fwd(logits, row_idx, row_w, col_idx, col_w, boxes, row_breaks, col_breaks, order,
                       threshold: float, score_mode: int):
    """Launch both kernels; same arguments and results as `torch.ops.cropformer_C.paste_entities`.

    Tiles must be at most TILE x TILE pixels (the plan is built with tile = TILE; `_tile_breaks`
    guarantees it). Nothing here waits for the device: the tile list and the survivor lists are built
    with device ops, and the launches run on the logits' device.
    Returns (id_map H x W int32, prob_sum Q float64, area Q int64, evaluated (1,) int64).
    """
    V, Q, h, w = logits.shape
    H, W = row_idx.shape[1], col_idx.shape[1]
    device = logits.device
    rb, cb = row_breaks.long(), col_breaks.long()
    # Tiles x 4 (ya, yb, xa, xb), row-major over the tile grid.
    R, C = rb.numel() - 1, cb.numel() - 1
    tiles = torch.stack([rb[:-1, None].expand(R, C), rb[1:, None].expand(R, C),
                         cb[None, :-1].expand(R, C), cb[None, 1:].expand(R, C)], -1)
    tiles = tiles.reshape(R * C, 4).to(torch.int32).contiguous()
    T = R * C
    flags = torch.empty(T, Q, dtype=torch.int8, device=device)
    id_map = torch.empty(H, W, dtype=torch.int32, device=device)
    prob_sum = torch.zeros(Q, dtype=torch.float64, device=device)
    area = torch.zeros(Q, dtype=torch.int64, device=device)
    evaluated = torch.zeros(1, dtype=torch.int64, device=device)
    with cuda_device_guard(logits.device):
        _paste_bounds_kernel[(T, triton.cdiv(Q, BLOCK_RANKS))](
            logits, row_idx, col_idx, boxes, tiles, order, flags,
            V, Q, h, w, H, W, threshold - BOUND_MARGIN, threshold + BOUND_MARGIN,
            BLOCK=BLOCK_RANKS,
        )
        # Survivors in rank order, up to and including the first query that is on over the whole tile.
        rank = torch.arange(Q, device=device)
        certain = (flags & 2) != 0
        first_certain = torch.where(certain.any(1), certain.to(torch.uint8).argmax(1), Q)
        keep = ((flags & 1) != 0) & (rank[None] <= first_certain[:, None])
        slot = torch.sort(torch.where(keep, rank[None], Q + rank[None]), dim=1).values % Q  # kept ranks first
        survivors = order.long()[slot].to(torch.int32).contiguous()
        n_survivors = keep.sum(1).to(torch.int32)
        _paste_pixels_kernel[(T,)](
            logits, row_idx, row_w, col_idx, col_w, boxes, tiles, survivors, n_survivors,
            id_map, prob_sum, area, evaluated,
            V, Q, h, w, H, W, threshold,
            SCORE_MODE=score_mode, TILE_SIDE=TILE, num_warps=8,
        )
    return id_map, prob_sum, area, evaluated
