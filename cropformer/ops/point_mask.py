"""Point-sampled mask matching costs and losses (Mask2Former / PointRend), one dispatch point each.

Mask2Former never compares full-resolution masks: it samples predicted mask logits (1/4 of the
input resolution) and ground-truth masks (input resolution) at the same normalised points with
bilinear interpolation (`grid_sample`, align_corners=False, zero padding), then computes a sigmoid
BCE and a dice term on the samples. The original code converts every ground-truth mask to float at
full resolution before sampling (`targets["masks"].to(out_mask)`); here the ground truth is read
straight from its compact bool/uint8 form by gathering the four bilinear neighbours of each point,
so no float copy of the masks ever exists.

Ops:

- `point_mask_cost`: Q x N BCE and dice matching costs on one point set shared by all masks
  (readable reference `point_mask_cost_ref`).
- `point_mask_loss`: per-pair BCE and dice losses, each pair with its own points; backward to the
  logits (reference `point_mask_loss_ref`).
- `sample_uncertain_points`: PointRend's importance sampling of the loss points.

Backends: "torch" is the reference: float logits through `grid_sample` (bit-identical to the
original's `point_sample`), compact gt through the 4-neighbour gather (agrees to ~1 ulp); it runs on
any device (the GPU path until kernels exist). "cpu" is the C++ extension (`csrc/point_mask/`):
sampling in the arithmetic of ATen's vectorised CPU `grid_sample` (bit-identical on AVX2/AVX-512
CPUs), points visited row by row, and a fused loss whose backward keeps only the M x P samples
instead of the gathered prediction rows. `auto` takes "cpu" for CPU float32/float64 inputs when
the extension is built, else "torch".

Point convention everywhere: (x, y) in [0, 1] of the padded frame; the bilinear sample of an
h x w map at (x, y) reads pixel centres at ((i + 0.5) / w, (j + 0.5) / h) and counts pixels outside
the map as 0, exactly as `point_sample(input, points, align_corners=False)`; points outside [0, 1]
therefore sample towards 0 (zero padding), as grid_sample does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import has_compiled_op, resolve, triton_usable


# --------------------------------------------------------------------------------------------------
# bilinear sampling (shared by the references)


def bilinear_taps(points: torch.Tensor, height: int, width: int):
    """The four bilinear neighbours of each point, grid_sample style (align_corners=False, zeros).

    Args:
        points: ... x 2, (x, y) normalised to [0, 1] (any value is accepted: zero padding outside).
        height, width: size of the sampled map.
    Returns:
        list of 4 (row ..., col ..., weight ...) in the order nw, ne, sw, se; rows/cols are int64
        clamped into the map, the weight of a neighbour outside the map is 0. The arithmetic is
        grid_sample's (grid = 2 * points - 1, then unnormalised), so results agree with
        `point_sample` to the last bits.
    """
    grid = 2.0 * points - 1.0
    ix = ((grid[..., 0] + 1) * width - 1) / 2
    iy = ((grid[..., 1] + 1) * height - 1) / 2
    x0, y0 = ix.floor(), iy.floor()
    x1, y1 = x0 + 1, y0 + 1
    corners = (
        (y0, x0, (x1 - ix) * (y1 - iy)),
        (y0, x1, (ix - x0) * (y1 - iy)),
        (y1, x0, (x1 - ix) * (iy - y0)),
        (y1, x1, (ix - x0) * (iy - y0)),
    )
    taps = []
    for y, x, w in corners:
        inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
        taps.append((y.clamp(0, height - 1).long(), x.clamp(0, width - 1).long(), w * inside))
    return taps


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of float maps, `point_sample(..., align_corners=False)` of detectron2.

    maps: K x C x h x w float; points: K x P x 2 (same dtype). Returns K x C x P (differentiable).
    """
    grid = 2.0 * points[:, :, None] - 1.0  # K x P x 1 x 2
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]


def sample_compact(masks: torch.Tensor, points: torch.Tensor, dtype: torch.dtype, rows: torch.Tensor | None = None):
    """Bilinear samples of compact masks, read in place (no float copy of the masks).

    Args:
        masks: K x T x H x W (or K x H x W) bool/uint8/float, any strides.
        points: P x 2 shared by all masks, or M x P x 2 with `rows` (M int64: mask k of each row).
        dtype: of the result.
    Returns:
        K x T x P (shared points) or M x P (per-row points), soft labels in [0, 1] for 0/1 masks.
    """
    out = None
    for y, x, w in bilinear_taps(points, masks.shape[-2], masks.shape[-1]):
        v = masks[..., y, x] if rows is None else masks[rows[:, None], y, x]
        v = v.to(dtype) * w.to(dtype)  # one neighbour at a time: never more than one extra K x T x P
        out = v if out is None else out + v
    return out


def _sample_logits_shared(pred: torch.Tensor, points: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q x T x h x w logits at P shared points -> Q x T x P in `dtype`."""
    q = pred.shape[0]
    pts = points.to(dtype)[None].expand(q, -1, -1)
    return point_sample(pred.to(dtype), pts)


def _sample_logits_rows(pred: torch.Tensor, rows: torch.Tensor | None, points: torch.Tensor, dtype: torch.dtype):
    """Row rows[m] of K x h x w logits at its own points M x P x 2 -> M x P (differentiable)."""
    picked = pred if rows is None else pred[rows]  # M x h x w, as the original's src_masks[src_idx]
    return point_sample(picked.to(dtype)[:, None], points.to(dtype))[:, 0]


def _cpu_ok(op: str):
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in (torch.float32, torch.float64) and has_compiled_op(op)

    return available


def _triton_ok(device: torch.device, dtype: torch.dtype) -> bool:
    # fp32 arithmetic inside; float64 stays on the reference
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and triton_usable(device)


def _choose(op: str, backend: str, device: torch.device, dtype: torch.dtype, cpu_op: str) -> str:
    # (`resolve` never auto-picks Triton for CPU tensors: that would be the interpreter)
    preference = (
        ("triton", _triton_ok, "Triton kernels"),
        ("cpu", _cpu_ok(cpu_op), "C++ kernels (csrc/point_mask)"),
    )
    return resolve(op, backend, device, dtype, preference)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Losses and costs are computed in fp32 (autocast off), float64 only for float64 inputs.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _is_mask_dtype(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bool, torch.uint8) or t.is_floating_point()


# --------------------------------------------------------------------------------------------------
# point_mask_cost


def _check_cost_inputs(pred_logits, gt_masks, points, gt_valid):
    """Normalise to pred Q x T x h x w, gt N x T x H x W, valid N x T (or None); clear errors."""
    if pred_logits.dim() not in (3, 4):
        raise ValueError(
            f"point_mask_cost: pred_logits must be Q x h x w or Q x T x h x w, got {tuple(pred_logits.shape)}"
        )
    if gt_masks.dim() != pred_logits.dim():
        raise ValueError(
            f"point_mask_cost: gt_masks {tuple(gt_masks.shape)} must have the same number of dims as pred_logits "
            f"{tuple(pred_logits.shape)} (N x H x W with Q x h x w, N x T x H x W with Q x T x h x w)"
        )
    if not pred_logits.is_floating_point():
        raise TypeError(f"point_mask_cost: pred_logits must be floating point, got {pred_logits.dtype}")
    if not _is_mask_dtype(gt_masks):
        raise TypeError(f"point_mask_cost: gt_masks must be bool, uint8 or float, got {gt_masks.dtype}")
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"point_mask_cost: points must be P x 2 (x, y), got {tuple(points.shape)}")
    if pred_logits.dim() == 3:
        pred_logits, gt_masks = pred_logits[:, None], gt_masks[:, None]
        if gt_valid is not None:
            if gt_valid.dim() != 1:
                raise ValueError(
                    f"point_mask_cost: gt_valid must be N for N x H x W masks, got {tuple(gt_valid.shape)}"
                )
            gt_valid = gt_valid[:, None]
    if pred_logits.shape[1] != gt_masks.shape[1]:
        raise ValueError(
            f"point_mask_cost: pred_logits has {pred_logits.shape[1]} views but gt_masks has {gt_masks.shape[1]}"
        )
    if gt_valid is not None and tuple(gt_valid.shape) != tuple(gt_masks.shape[:2]):
        raise ValueError(
            f"point_mask_cost: gt_valid {tuple(gt_valid.shape)} must be N x T = {tuple(gt_masks.shape[:2])}"
        )
    return pred_logits, gt_masks, gt_valid


def point_mask_cost_ref(pred_logits, gt_masks, points, gt_valid=None):
    """Readable reference of Mask2Former's matching costs (`batch_sigmoid_ce_loss`, `batch_dice_loss`).

    Args:
        pred_logits: Q x h x w mask logits, or Q x T x h x w with a view dimension.
        gt_masks: N x H x W bool/uint8 (or float 0/1) masks, or N x T x H x W; any strides (views of
            bigger tensors are read in place, never copied or converted to float).
        points: P x 2 (x, y) in [0, 1], one point set shared by every query, target and view.
        gt_valid: optional N (or N x T) bool; False makes that (target, view) an all-zero mask.
    Returns:
        (bce, dice), each Q x N float32 (float64 for float64 logits): with x the T*P sampled logits of
        a query and t the T*P soft (bilinear) gt samples of a target,
        bce = mean over points of BCE-with-logits(x, t), dice = 1 - (2 sum(s t) + 1) / (sum s + sum t + 1),
        s = sigmoid(x). No gradient (matching).
    """
    pred, gt, valid = _check_cost_inputs(pred_logits, gt_masks, points, gt_valid)
    dtype = _compute_dtype(pred)
    with torch.no_grad():
        x = _sample_logits_shared(pred, points, dtype)  # Q x T x P
        t = sample_compact(gt, points, dtype)  # N x T x P
        return _costs_from_samples(x, t, valid)


def _costs_from_samples(x, t, valid):
    """x Q x T x P logits, t N x T x P soft labels, valid N x T or None -> (bce, dice) Q x N."""
    if valid is not None:
        t = t * valid[..., None].to(t.dtype)
    x, t = x.flatten(1), t.flatten(1)  # Q x T*P, N x T*P
    # sum_p BCE(x, t) = sum_p softplus(x) - x t  (softplus(-x) - softplus(x) = -x): one matmul
    bce = (F.softplus(x).sum(1, keepdim=True) - x @ t.T) / x.shape[1]
    s = x.sigmoid()
    dice = 1 - (2 * (s @ t.T) + 1) / (s.sum(1)[:, None] + t.sum(1)[None, :] + 1)
    return bce, dice


def _cost_cpu(pred_logits, gt_masks, points, gt_valid):
    """C++ sampling of logits and compact masks (`point_mask_sample_shared`) + the same two matmuls."""
    pred, gt, valid = _check_cost_inputs(pred_logits, gt_masks, points, gt_valid)
    dtype = _compute_dtype(pred)
    with torch.no_grad():
        pts = points.to(dtype).contiguous()
        x = torch.ops.cropformer_C.point_mask_sample_shared(pred.to(dtype), pts)
        t = torch.ops.cropformer_C.point_mask_sample_shared(_as_sampleable(gt), pts)  # in the points' dtype
        return _costs_from_samples(x, t, valid)


def _cost_triton(pred_logits, gt_masks, points, gt_valid):
    """Triton sampling of logits and compact masks + the same two matmuls (fp32)."""
    from cropformer.kernels.point_mask import sample_shared

    pred, gt, valid = _check_cost_inputs(pred_logits, gt_masks, points, gt_valid)
    with torch.no_grad():
        pts = points.float()
        return _costs_from_samples(sample_shared(pred, pts), sample_shared(gt, pts), valid)


def _as_sampleable(gt: torch.Tensor) -> torch.Tensor:
    # bool and uint8 share a byte layout: reinterpret, never convert (no copy for any strides).
    return gt.view(torch.uint8) if gt.dtype == torch.bool else gt


def point_mask_cost(pred_logits, gt_masks, points, *, gt_valid=None, backend="auto"):
    """Matching costs on shared points; see `point_mask_cost_ref` for shapes and semantics.

    backend: "auto" | "torch" | "cpu" (C++ sampling, when the extension is built) | "triton" (GPU).
    """
    choice = _choose("point_mask_cost", backend, pred_logits.device, pred_logits.dtype, "point_mask_sample_shared")
    if choice == "cpu":
        return _cost_cpu(pred_logits, gt_masks, points, gt_valid)
    if choice == "triton":
        return _cost_triton(pred_logits, gt_masks, points, gt_valid)
    return point_mask_cost_ref(pred_logits, gt_masks, points, gt_valid)


# --------------------------------------------------------------------------------------------------
# point_mask_loss


def _check_loss_inputs(pred_logits, gt_masks, points, pred_index, gt_index, gt_valid):
    if pred_logits.dim() != 3 or gt_masks.dim() != 3:
        raise ValueError(
            f"point_mask_loss: pred_logits and gt_masks must be K x h x w and K' x H x W, got "
            f"{tuple(pred_logits.shape)} and {tuple(gt_masks.shape)}"
        )
    if not pred_logits.is_floating_point():
        raise TypeError(f"point_mask_loss: pred_logits must be floating point, got {pred_logits.dtype}")
    if not _is_mask_dtype(gt_masks):
        raise TypeError(f"point_mask_loss: gt_masks must be bool, uint8 or float, got {gt_masks.dtype}")
    if points.dim() != 3 or points.shape[2] != 2:
        raise ValueError(f"point_mask_loss: points must be M x P x 2 (x, y), got {tuple(points.shape)}")
    m = points.shape[0]
    checks = (("pred_index", pred_index, pred_logits.shape[0]), ("gt_index", gt_index, gt_masks.shape[0]))
    for name, index, rows in checks:
        if index is None:
            if rows != m:
                raise ValueError(
                    f"point_mask_loss: {m} point sets but {rows} {name[:-6]} masks (pass {name} to pick rows)"
                )
        elif index.dim() != 1 or index.shape[0] != m or index.dtype != torch.int64:
            raise ValueError(
                f"point_mask_loss: {name} must be int64 of shape ({m},), got {index.dtype} {tuple(index.shape)}"
            )
    if gt_valid is not None and tuple(gt_valid.shape) != (m,):
        raise ValueError(f"point_mask_loss: gt_valid must be ({m},), got {tuple(gt_valid.shape)}")


def point_mask_loss_ref(pred_logits, gt_masks, points, *, pred_index=None, gt_index=None, gt_valid=None):
    """Readable reference of Mask2Former's point losses (`sigmoid_ce_loss`, `dice_loss`), per pair.

    Args:
        pred_logits: M x h x w mask logits of the matched predictions, or K x h x w with
            `pred_index` (M int64) picking the row of each pair (no gathered copy).
        gt_masks: M x H x W bool/uint8 (or float) masks, or K' x H x W with `gt_index` (M int64).
        points: M x P x 2 (x, y) in [0, 1], each pair's own points.
        gt_valid: optional M bool; False makes that pair's target all zero.
    Returns:
        (bce, dice), each M float32 (float64 for float64 logits), differentiable w.r.t. pred_logits:
        bce = mean over the P points of BCE-with-logits, dice = 1 - (2 sum(s t) + 1) / (sum s + sum t + 1),
        s = sigmoid of the sampled logit, t = bilinear (soft) gt sample. The original divides their
        sums by num_masks; the caller does that.
    """
    _check_loss_inputs(pred_logits, gt_masks, points, pred_index, gt_index, gt_valid)
    dtype = _compute_dtype(pred_logits)
    x = _sample_logits_rows(pred_logits, pred_index, points, dtype)  # M x P
    with torch.no_grad():
        if gt_index is None:
            gt_index = torch.arange(gt_masks.shape[0], device=gt_masks.device)
        t = sample_compact(gt_masks, points, dtype, rows=gt_index)
        if gt_valid is not None:
            t = t * gt_valid[:, None].to(dtype)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)
    s = x.sigmoid()
    dice = 1 - (2 * (s * t).sum(1) + 1) / (s.sum(1) + t.sum(1) + 1)
    return bce, dice


class _PointMaskLossCPU(torch.autograd.Function):
    """Fused C++ forward/backward: saves only the M x P samples, recomputes the taps in backward."""

    @staticmethod
    def forward(ctx, pred_logits, gt_masks, points, pred_index, gt_index, gt_valid):
        bce, dice, x, t = torch.ops.cropformer_C.point_mask_loss_fwd(
            pred_logits, gt_masks, points, pred_index, gt_index, gt_valid
        )
        ctx.save_for_backward(points, pred_index, x, t)
        ctx.pred_shape = pred_logits.shape
        return bce, dice

    @staticmethod
    def backward(ctx, grad_bce, grad_dice):
        points, pred_index, x, t = ctx.saved_tensors
        grad_pred = torch.ops.cropformer_C.point_mask_loss_bwd(
            grad_bce.contiguous(), grad_dice.contiguous(), points, pred_index, x, t, list(ctx.pred_shape)
        )
        return grad_pred, None, None, None, None, None


def _loss_cpu(pred_logits, gt_masks, points, pred_index, gt_index, gt_valid):
    _check_loss_inputs(pred_logits, gt_masks, points, pred_index, gt_index, gt_valid)
    dtype = _compute_dtype(pred_logits)
    m = points.shape[0]
    arange = torch.arange(m, dtype=torch.int64)
    pred_index = arange if pred_index is None else pred_index.contiguous()
    gt_index = arange if gt_index is None else gt_index.contiguous()
    gt_valid = torch.ones(m, dtype=torch.uint8) if gt_valid is None else gt_valid.to(torch.uint8).contiguous()
    pred = pred_logits.to(dtype)
    if not pred.is_contiguous():
        pred = pred.contiguous()
    pts = points.to(dtype).contiguous()
    return _PointMaskLossCPU.apply(pred, _as_sampleable(gt_masks), pts, pred_index, gt_index, gt_valid)


def point_mask_loss(pred_logits, gt_masks, points, *, pred_index=None, gt_index=None, gt_valid=None, backend="auto"):
    """Per-pair point losses; see `point_mask_loss_ref` for shapes and semantics.

    backend: "auto" | "torch" | "cpu" (fused C++ forward and backward, when the extension is built) |
    "triton" (fused kernels, GPU). The fused paths keep only the points and the M x P samples for the
    backward.
    """
    choice = _choose("point_mask_loss", backend, pred_logits.device, pred_logits.dtype, "point_mask_loss_fwd")
    if choice == "cpu":
        return _loss_cpu(pred_logits, gt_masks, points, pred_index, gt_index, gt_valid)
    if choice == "triton":
        from cropformer.kernels.point_mask import point_mask_loss as triton_point_mask_loss

        _check_loss_inputs(pred_logits, gt_masks, points, pred_index, gt_index, gt_valid)
        m, dev = points.shape[0], pred_logits.device
        arange = torch.arange(m, device=dev)
        valid = torch.ones(m, dtype=torch.uint8, device=dev) if gt_valid is None else gt_valid.to(torch.uint8)
        return triton_point_mask_loss(
            pred_logits,
            gt_masks,
            points.float(),
            arange if pred_index is None else pred_index,
            arange if gt_index is None else gt_index,
            valid,
        )
    return point_mask_loss_ref(
        pred_logits, gt_masks, points, pred_index=pred_index, gt_index=gt_index, gt_valid=gt_valid
    )


# --------------------------------------------------------------------------------------------------
# sample_uncertain_points


def _sample_candidates(logits, index, candidates, backend):
    """M x S float32 logits at the candidate points (no gradient)."""
    choice = _choose("sample_uncertain_points", backend, logits.device, logits.dtype, "point_mask_sample_rows")
    if choice == "triton":
        from cropformer.kernels.point_mask import sample_rows

        index = torch.arange(candidates.shape[0], device=logits.device) if index is None else index
        return sample_rows(logits, index, candidates)
    if choice == "cpu":
        m = candidates.shape[0]
        index = torch.arange(m) if index is None else index.contiguous()
        maps = logits.float().contiguous()  # no copy for the usual contiguous fp32 logits
        return torch.ops.cropformer_C.point_mask_sample_rows(maps, index, candidates)
    return _sample_logits_rows(logits, index, candidates, torch.float32)


def sample_uncertain_points(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
    *,
    index: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """PointRend importance sampling of loss points (`get_uncertain_point_coords_with_randomness`).

    Draws int(num_points * oversample_ratio) uniform candidates per mask, keeps the
    int(importance_sample_ratio * num_points) most uncertain ones (uncertainty = -|logit| at the
    point, bilinear), and appends num_points - that many fresh uniform points. The draws are two
    `torch.rand` calls in the original's order and shapes (M x S x 2, then M x R x 2), so the same
    generator state gives the original's points.

    Args:
        logits: M x h x w mask logits, or K x h x w with `index` (M int64) picking the rows.
        generator: torch.Generator on the logits' device (None = the global generator).
        backend: "auto" | "torch" (grid_sample on the picked rows) | "cpu" (C++) | "triton" (GPU):
            how the candidates are sampled (the rows in place for the last two).
    Returns:
        M x num_points x 2 (x, y) in [0, 1], float32. No gradient.
    """
    if logits.dim() != 3:
        raise ValueError(f"sample_uncertain_points: logits must be M x h x w, got {tuple(logits.shape)}")
    if num_points < 1 or oversample_ratio < 1:
        raise ValueError(
            f"sample_uncertain_points: need num_points >= 1 and oversample_ratio >= 1, got {num_points}, "
            f"{oversample_ratio}"
        )
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"sample_uncertain_points: importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    m = logits.shape[0] if index is None else index.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    device = logits.device
    with torch.no_grad():
        candidates = torch.rand(m, num_sampled, 2, device=device, generator=generator)
        uncertainty = -_sample_candidates(logits, index, candidates, backend).abs()  # M x S
        top = uncertainty.topk(num_uncertain, dim=1).indices  # M x num_uncertain
        coords = candidates.gather(1, top[..., None].expand(-1, -1, 2))
        if num_random > 0:
            coords = torch.cat([coords, torch.rand(m, num_random, 2, device=device, generator=generator)], dim=1)
    return coords
