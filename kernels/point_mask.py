"""Point-sampled mask costs and losses in Triton (the GPU path of `cropformer.ops.point_mask`).

Semantics are those of `point_mask_cost_ref` / `point_mask_loss_ref` / `sample_uncertain_points`:
bilinear sampling as grid_sample(align_corners=False, padding_mode="zeros") on grid = 2 * p - 1,
ground truth read in place from its compact bool/uint8 form (any strides), fp32 arithmetic.

Kernels:
- `_point_mask_sample_kernel`: maps K x T x H x W (any strides, float or uint8) at P shared points ->
  K x T x P; one program per (map, block of points). Feeds the matching costs (the Q x N matmuls
  stay in torch) and, with a row index and per-row points, the uncertainty of the loss candidates.
- `_point_mask_loss_fwd_kernel`: one program per matched pair: samples logit x and label t at the
  pair's P points, accumulates BCE, sum(s t), sum(s), sum(t) (s = sigmoid(x)), writes the per-pair
  BCE mean and dice, and the M x P samples x, t (all that the backward needs).
- `_point_mask_loss_bwd_kernel`: one program per pair: re-reduces the sums from x, t, then scatters
  d(loss)/dx times the bilinear weights into the pair's prediction row with atomic adds (fp32
  buffer, cast to the logits' dtype at the end).

Inputs are validated by the dispatch (`cropformer.ops.point_mask`, which also holds the custom ops and
their autograd) before these launchers run. Every launch runs on the device of its tensors
(`cuda_device_guard`), not on the current device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cropformer.ops._dispatch import cuda_device_guard


@triton.jit
def _bilinear(base, px, py, H, W, s_h, s_w, ok):
    """Bilinear sample (fp32) of the map at `base` (element strides s_h, s_w) at normalised points."""
    gx = px * 2.0 - 1.0
    gy = py * 2.0 - 1.0
    ix = gx * (W * 0.5) + (W - 1) * 0.5
    iy = gy * (H * 0.5) + (H - 1) * 0.5
    # points far outside (or NaN) touch nothing; clamping keeps the int conversion in range
    ok = ok & (ix > -1.0) & (ix < W) & (iy > -1.0) & (iy < H)
    ix = tl.where(ok, ix, 0.0)
    iy = tl.where(ok, iy, 0.0)
    fx = tl.floor(ix)
    fy = tl.floor(iy)
    wx = ix - fx
    wy = iy - fy
    x0 = fx.to(tl.int32)
    y0 = fy.to(tl.int32)
    in_x0 = x0 >= 0
    in_x1 = x0 + 1 < W
    in_y0 = y0 >= 0
    in_y1 = y0 + 1 < H
    row0 = y0.to(tl.int64) * s_h
    row1 = row0 + s_h
    col0 = x0.to(tl.int64) * s_w
    col1 = col0 + s_w
    v00 = tl.load(base + row0 + col0, mask=ok & in_y0 & in_x0, other=0).to(tl.float32)
    v01 = tl.load(base + row0 + col1, mask=ok & in_y0 & in_x1, other=0).to(tl.float32)
    v10 = tl.load(base + row1 + col0, mask=ok & in_y1 & in_x0, other=0).to(tl.float32)
    v11 = tl.load(base + row1 + col1, mask=ok & in_y1 & in_x1, other=0).to(tl.float32)
    return v00 * ((1.0 - wx) * (1.0 - wy)) + v01 * (wx * (1.0 - wy)) + v10 * ((1.0 - wx) * wy) + v11 * (wx * wy)


@triton.jit
def _log1p(u):
    """log(1 + u) to fp32 accuracy for small u (Kahan's correction), without libdevice."""
    v = 1.0 + u
    return tl.where(v == 1.0, u, tl.log(v) * u / (v - 1.0))


@triton.jit
def _point_mask_sample_kernel(
    maps_ptr, index_ptr, pts_ptr, out_ptr,
    T, P, H, W, s_k, s_t, s_h, s_w,
    HAS_INDEX: tl.constexpr, ROW_POINTS: tl.constexpr, BLOCK: tl.constexpr,
):
    kt = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P
    k = kt // T
    if HAS_INDEX:
        k = tl.load(index_ptr + kt).to(tl.int64)
    base = maps_ptr + k * s_k + (kt % T) * s_t
    pt = offs.to(tl.int64) * 2
    if ROW_POINTS:  # each map row has its own points (kt x P x 2)
        pt += kt * P * 2
    px = tl.load(pts_ptr + pt, mask=ok, other=0.0).to(tl.float32)
    py = tl.load(pts_ptr + pt + 1, mask=ok, other=0.0).to(tl.float32)
    v = _bilinear(base, px, py, H, W, s_h, s_w, ok)
    tl.store(out_ptr + kt * P + offs, v, mask=ok)


@triton.jit
def _point_mask_loss_fwd_kernel(
    pred_ptr, gt_ptr, pts_ptr, pidx_ptr, gidx_ptr, valid_ptr,
    bce_ptr, dice_ptr, x_ptr, t_ptr,
    P, h, w, H, W, sp_k, sp_h, sp_w, sg_k, sg_h, sg_w,
    BLOCK: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    pbase = pred_ptr + tl.load(pidx_ptr + m).to(tl.int64) * sp_k
    gbase = gt_ptr + tl.load(gidx_ptr + m).to(tl.int64) * sg_k
    valid = tl.load(valid_ptr + m).to(tl.float32)
    acc_bce = tl.zeros([BLOCK], dtype=tl.float32)
    acc_st = tl.zeros([BLOCK], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < P
        pt = (m * P + offs) * 2
        px = tl.load(pts_ptr + pt, mask=ok, other=0.0).to(tl.float32)
        py = tl.load(pts_ptr + pt + 1, mask=ok, other=0.0).to(tl.float32)
        x = _bilinear(pbase, px, py, h, w, sp_h, sp_w, ok)
        t = _bilinear(gbase, px, py, H, W, sg_h, sg_w, ok) * valid
        s = tl.sigmoid(x)
        bce = tl.maximum(x, 0.0) - x * t + _log1p(tl.exp(-tl.abs(x)))
        acc_bce += tl.where(ok, bce, 0.0)
        acc_st += tl.where(ok, s * t, 0.0)
        acc_s += tl.where(ok, s, 0.0)
        acc_t += tl.where(ok, t, 0.0)
        tl.store(x_ptr + m * P + offs, x, mask=ok)
        tl.store(t_ptr + m * P + offs, t, mask=ok)
    tl.store(bce_ptr + m, tl.sum(acc_bce, axis=0) / P)
    denom = tl.sum(acc_s, axis=0) + tl.sum(acc_t, axis=0) + 1.0
    tl.store(dice_ptr + m, 1.0 - (2.0 * tl.sum(acc_st, axis=0) + 1.0) / denom)


@triton.jit
def _scatter_bilinear(base, px, py, h, w, g, ok):
    """grad[row] at the 4 neighbours += g * weight (contiguous h x w row at `base`)."""
    gx = px * 2.0 - 1.0
    gy = py * 2.0 - 1.0
    ix = gx * (w * 0.5) + (w - 1) * 0.5
    iy = gy * (h * 0.5) + (h - 1) * 0.5
    ok = ok & (ix > -1.0) & (ix < w) & (iy > -1.0) & (iy < h)
    ix = tl.where(ok, ix, 0.0)
    iy = tl.where(ok, iy, 0.0)
    fx = tl.floor(ix)
    fy = tl.floor(iy)
    wx = ix - fx
    wy = iy - fy
    x0 = fx.to(tl.int32)
    y0 = fy.to(tl.int32)
    in_x0 = x0 >= 0
    in_x1 = x0 + 1 < w
    in_y0 = y0 >= 0
    in_y1 = y0 + 1 < h
    off = y0.to(tl.int64) * w + x0
    tl.atomic_add(base + off, g * ((1.0 - wx) * (1.0 - wy)), mask=ok & in_y0 & in_x0)
    tl.atomic_add(base + off + 1, g * (wx * (1.0 - wy)), mask=ok & in_y0 & in_x1)
    tl.atomic_add(base + off + w, g * ((1.0 - wx) * wy), mask=ok & in_y1 & in_x0)
    tl.atomic_add(base + off + w + 1, g * (wx * wy), mask=ok & in_y1 & in_x1)


@triton.jit
def _point_mask_loss_bwd_kernel(
    grad_bce_ptr, grad_dice_ptr, pts_ptr, pidx_ptr, x_ptr, t_ptr, grad_ptr,
    P, h, w,
    BLOCK: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    acc_st = tl.zeros([BLOCK], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < P
        x = tl.load(x_ptr + m * P + offs, mask=ok, other=0.0)
        t = tl.load(t_ptr + m * P + offs, mask=ok, other=0.0)
        s = tl.sigmoid(x)
        acc_st += tl.where(ok, s * t, 0.0)
        acc_s += tl.where(ok, s, 0.0)
        acc_t += tl.where(ok, t, 0.0)
    numer = 2.0 * tl.sum(acc_st, axis=0) + 1.0
    denom = tl.sum(acc_s, axis=0) + tl.sum(acc_t, axis=0) + 1.0
    g_bce = tl.load(grad_bce_ptr + m).to(tl.float32) / P
    g_dice = tl.load(grad_dice_ptr + m).to(tl.float32)
    base = grad_ptr + tl.load(pidx_ptr + m).to(tl.int64) * h * w
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < P
        x = tl.load(x_ptr + m * P + offs, mask=ok, other=0.0)
        t = tl.load(t_ptr + m * P + offs, mask=ok, other=0.0)
        s = tl.sigmoid(x)
        d_dice = -(2.0 * t * denom - numer) / (denom * denom)
        g = g_bce * (s - t) + g_dice * d_dice * s * (1.0 - s)
        pt = (m * P + offs) * 2
        px = tl.load(pts_ptr + pt, mask=ok, other=0.0).to(tl.float32)
        py = tl.load(pts_ptr + pt + 1, mask=ok, other=0.0).to(tl.float32)
        _scatter_bilinear(base, px, py, h, w, g, ok)


# --------------------------------------------------------------------------------------------------
# launchers


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def sample_shared(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """maps K x T x H x W (float or bool/uint8, any strides), points P x 2 -> K x T x P float32."""
    K, T, H, W = maps.shape
    P = points.shape[0]
    out = torch.empty(K, T, P, device=maps.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    maps = _byte_view(maps)
    BLOCK = 256
    grid = (K * T, triton.cdiv(P, BLOCK))
    with cuda_device_guard(maps.device):
        _point_mask_sample_kernel[grid](
            maps, maps, points.contiguous(), out, T, P, H, W, *maps.stride(),
            HAS_INDEX=False, ROW_POINTS=False, BLOCK=BLOCK,
        )
    return out


def sample_rows(maps: torch.Tensor, index: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Row index[m] of maps K x h x w (any strides) at its own points M x S x 2 -> M x S float32."""
    M, S = points.shape[:2]
    out = torch.empty(M, S, device=maps.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    BLOCK = 256
    s_k, s_h, s_w = maps.stride()
    grid = (M, triton.cdiv(S, BLOCK))
    with cuda_device_guard(maps.device):
        _point_mask_sample_kernel[grid](
            maps, index.contiguous(), points.contiguous(), out, 1, S, maps.shape[1], maps.shape[2], s_k, 0, s_h, s_w,
            HAS_INDEX=True, ROW_POINTS=True, BLOCK=BLOCK,
        )
    return out


def loss_fwd(pred, gt, points, pred_index, gt_index, gt_valid):
    """Per-pair (bce M, dice M) in float32 and the samples (x M x P, t M x P) for the backward."""
    M, P = points.shape[:2]
    dev = pred.device
    bce = torch.empty(M, device=dev, dtype=torch.float32)
    dice = torch.empty(M, device=dev, dtype=torch.float32)
    x = torch.empty(M, P, device=dev, dtype=torch.float32)
    t = torch.empty(M, P, device=dev, dtype=torch.float32)
    if M == 0:
        return bce, dice, x, t
    gt = _byte_view(gt)
    with cuda_device_guard(pred.device):
        _point_mask_loss_fwd_kernel[(M,)](
            pred, gt, points.contiguous(), pred_index.contiguous(), gt_index.contiguous(), gt_valid.contiguous(),
            bce, dice, x, t,
            P, pred.shape[1], pred.shape[2], gt.shape[1], gt.shape[2], *pred.stride(), *gt.stride(),
            BLOCK=1024,
        )
    return bce, dice, x, t


def loss_bwd(grad_bce, grad_dice, points, pred_index, x, t, pred_shape, dtype):
    """Gradient w.r.t. the K x h x w logits (zero outside the sampled neighbourhoods)."""
    M, P = x.shape
    grad = torch.zeros(pred_shape, device=x.device, dtype=torch.float32)
    if M:
        with cuda_device_guard(x.device):
            _point_mask_loss_bwd_kernel[(M,)](
                grad_bce.contiguous(), grad_dice.contiguous(), points.contiguous(), pred_index.contiguous(), x, t,
                grad, P, pred_shape[1], pred_shape[2],
                BLOCK=1024,
            )
    return grad.to(dtype)
