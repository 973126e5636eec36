"""Multi-scale deformable attention (Deformable DETR) in Triton: forward and backward.

Semantics are those of `cropformer.ops.ms_deform_attn.ms_deform_attn_ref`: value B x S x H x D,
spatial_shapes L x 2 (h, w), level_start_index L, sampling_locations B x Q x H x L x P x 2 as (x, y) in
[0, 1] of each level (bilinear, zero padding, align_corners=False), attention_weights B x Q x H x L x P;
output B x Q x (H * D). The bilinear arithmetic matches csrc/ms_deform_attn/ms_deform_attn.h: pixel
coordinates x = loc_x * w - 0.5, corners at floor(x) and floor(x) + 1, a location with no corner inside
samples zero and gets a zero gradient. A level whose integers do not lie inside value (negative start, an
empty side, or start + h * w > S: the dispatch validates levels on the host only for CPU tensors or in debug
mode) is skipped the same way, so bad levels never read out of bounds.

Tiling: the output is B*Q*H rows r = (b * Q + q) * H + h of D channels; one program owns BLOCK_R
consecutive rows (so the sampling_locations, attention_weights and output it touches are contiguous) and
all channels (padded to BLOCK_D). It loops over the L x P samples, gathering the four corner rows of D
channels from value and accumulating in fp32 (fp64 for fp64 inputs).

Backward: the same tiling. Per sample, the four dot products <grad_out, value at corner> over the channels
give grad_attention_weights and grad_sampling_locations; grad_value is scattered with atomic adds into
an fp32 (fp64) buffer, cast to value's dtype at the end.

Inputs are validated by the dispatch (`cropformer.ops.ms_deform_attn`) before these launchers run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cropformer.ops._dispatch import cuda_device_guard


@triton.jit
def _corner_offsets(base, xi, yi, hl, wl, HD, inside):
    """Element offset of value[b, start + yi * w + xi, h, 0] for each row, and whether the corner is inside.

    The offset of an outside corner is left as computed (loads and atomics masked with `ok` never touch it):
    zeroing it with tl.where(ok, ...) crashes Triton 3.6 and 3.7's layout pass (issue 14)."""
    ok = inside & (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl)
    off = base + (yi.to(tl.int64) * wl + xi) * HD
    return off, ok


@triton.jit
def _footprint(loc_ptr, attn_ptr, rows, row_ok, k, LP, hf, wf, ACC: tl.constexpr):
    """Location, weight and floor decomposition of sample k of each row (see the module docstring)."""
    lx = tl.load(loc_ptr + (rows * LP + k) * 2, mask=row_ok, other=0.0).to(ACC)
    ly = tl.load(loc_ptr + (rows * LP + k) * 2 + 1, mask=row_ok, other=0.0).to(ACC)
    a = tl.load(attn_ptr + rows * LP + k, mask=row_ok, other=0.0).to(ACC)
    x = lx * wf - 0.5
    y = ly * hf - 0.5
    # no corner inside (or NaN): skip; zeroing x, y keeps the int conversion below in range
    inside = row_ok & (x >= -1.0) & (x < wf) & (y >= -1.0) & (y < hf)
    x = tl.where(inside, x, 0.0)
    y = tl.where(inside, y, 0.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return a, x - x0f, y - y0f, x0f.to(tl.int32), y0f.to(tl.int32), inside


@triton.jit
def _ms_deform_attn_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    n_rows, QH, S, H, D, L, P,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    b = rows // QH
    h = rows % H
    ch = tl.arange(0, BLOCK_D)
    ch_ok = ch < D
    HD = H * D
    LP = L * P
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    for l in range(L):
        hl = tl.load(shapes_ptr + 2 * l)
        wl = tl.load(shapes_ptr + 2 * l + 1)
        start = tl.load(starts_ptr + l)
        hf = hl.to(ACC)
        wf = wl.to(ACC)
        level_ok = row_ok & (start >= 0) & (hl >= 1) & (wl >= 1) & (start + hl * wl <= S)
        base = ((b * S + start) * H + h) * D  # value[b, start, h, 0]
        for p in range(P):
            a, fx, fy, x0, y0, inside = _footprint(loc_ptr, attn_ptr, rows, level_ok, l * P + p, LP, hf, wf, ACC)
            gx = 1.0 - fx
            gy = 1.0 - fy
            for c in tl.static_range(4):
                dx = c % 2
                dy = c // 2
                off, ok = _corner_offsets(base, x0 + dx, y0 + dy, hl, wl, HD, inside)
                wx = fx if dx == 1 else gx
                wy = fy if dy == 1 else gy
                v = tl.load(value_ptr + off[:, None] + ch[None, :], mask=ok[:, None] & ch_ok[None, :], other=0.0)
                acc += (a * wx * wy)[:, None] * v.to(ACC)
    tl.store(out_ptr + rows[:, None] * D + ch[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & ch_ok[None, :])


@triton.jit
def _ms_deform_attn_bwd_kernel(
    grad_out_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    n_rows, QH, S, H, D, L, P,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    b = rows // QH
    h = rows % H
    ch = tl.arange(0, BLOCK_D)
    ch_ok = ch < D
    HD = H * D
    LP = L * P
    go = tl.load(grad_out_ptr + rows[:, None] * D + ch[None, :], mask=row_ok[:, None] & ch_ok[None, :],
                 other=0.0).to(ACC)
    for l in range(L):
        hl = tl.load(shapes_ptr + 2 * l)
        wl = tl.load(shapes_ptr + 2 * l + 1)
        start = tl.load(starts_ptr + l)
        hf = hl.to(ACC)
        wf = wl.to(ACC)
        level_ok = row_ok & (start >= 0) & (hl >= 1) & (wl >= 1) & (start + hl * wl <= S)
        base = ((b * S + start) * H + h) * D
        for p in range(P):
            k = l * P + p
            a, fx, fy, x0, y0, inside = _footprint(loc_ptr, attn_ptr, rows, level_ok, k, LP, hf, wf, ACC)
            gx = 1.0 - fx
            gy = 1.0 - fy
            grad_a = tl.zeros((BLOCK_R,), dtype=ACC)
            grad_x = tl.zeros((BLOCK_R,), dtype=ACC)
            grad_y = tl.zeros((BLOCK_R,), dtype=ACC)
            for c in tl.static_range(4):
                dx = c % 2
                dy = c // 2
                off, ok = _corner_offsets(base, x0 + dx, y0 + dy, hl, wl, HD, inside)
                wx = fx if dx == 1 else gx
                wy = fy if dy == 1 else gy
                ptrs = off[:, None] + ch[None, :]
                m = ok[:, None] & ch_ok[None, :]
                v = tl.load(value_ptr + ptrs, mask=m, other=0.0).to(ACC)
                tl.atomic_add(grad_value_ptr + ptrs, (a * wx * wy)[:, None] * go, mask=m)
                t = tl.sum(go * v, axis=1)  # <grad_out, value at corner>
                grad_a += wx * wy * t
                # d(wx)/dx = +1 for the x0 + 1 corner, -1 for x0; likewise y
                grad_x += (wy * t) if dx == 1 else (-wy * t)
                grad_y += (wx * t) if dy == 1 else (-wx * t)
            out_ty = grad_loc_ptr.dtype.element_ty
            tl.store(grad_attn_ptr + rows * LP + k, grad_a.to(out_ty), mask=row_ok)
            tl.store(grad_loc_ptr + (rows * LP + k) * 2, (a * wf * grad_x).to(out_ty), mask=row_ok)
            tl.store(grad_loc_ptr + (rows * LP + k) * 2 + 1, (a * hf * grad_y).to(out_ty), mask=row_ok)


def _launch_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): a 2048-element tile, e.g. 64 rows x 32 channels."""
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 2048 // block_d))
    return block_r, block_d, 4


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """B x Q x (H * D) in value's dtype; shapes as in the module docstring, all contiguous."""
    B, S, H, D = value.shape
    Q, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    out = torch.empty(B, Q, H * D, dtype=value.dtype, device=value.device)
    n_rows = B * Q * H
    if n_rows == 0:
        return out
    block_r, block_d, num_warps = _launch_config(D)
    grid = (triton.cdiv(n_rows, block_r),)
    with cuda_device_guard(value.device):
        _ms_deform_attn_fwd_kernel[grid](
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
            n_rows, Q * H, S, H, D, L, P,
            BLOCK_R=block_r, BLOCK_D=block_d, ACC=_acc_dtype(value.dtype), num_warps=num_warps,
        )
    return out


def ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights):
    """(grad_value, grad_sampling_locations, grad_attention_weights), each like its input; grad_output is
    B x Q x (H * D), contiguous."""
    B, S, H, D = value.shape
    Q, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    acc_torch = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc_torch, device=value.device)
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    n_rows = B * Q * H
    if n_rows > 0:
        block_r, block_d, num_warps = _launch_config(D)
        grid = (triton.cdiv(n_rows, block_r),)
        with cuda_device_guard(value.device):
            _ms_deform_attn_bwd_kernel[grid](
                grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                grad_value, grad_loc, grad_attn,
                n_rows, Q * H, S, H, D, L, P,
                BLOCK_R=block_r, BLOCK_D=block_d, ACC=_acc_dtype(value.dtype), num_warps=num_warps,
            )
    return grad_value.to(value.dtype), grad_loc, grad_attn


class MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_output):
        grad_value, grad_loc, grad_attn = ms_deform_attn_backward(grad_output.contiguous(), *ctx.saved_tensors)
        return grad_value, None, None, grad_loc, grad_attn


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Autograd-aware Triton multi-scale deformable attention (no input validation: use the dispatch)."""
    return MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)
