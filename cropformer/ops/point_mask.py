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
any device. "cpu" is the C++ extension (`csrc/point_mask/`): sampling in the arithmetic of ATen's
vectorised CPU `grid_sample` (bit-identical on AVX2/AVX-512 CPUs), points visited row by row, and a
fused loss whose backward keeps only the M x P samples instead of the gathered prediction rows.
"triton" (`kernels/point_mask.py`, GPU) does the same with fp32 arithmetic for fp32/fp16/bf16 logits.
`auto` takes Triton for CUDA tensors, "cpu" for CPU float32/float64 inputs when the extension is
built, else "torch". The fast paths are `torch.library` custom ops (`torch.ops.cropformer.point_mask_*`,
with fake implementations, the loss with registered autograd), so `torch.compile(fullgraph=True)`
traces them as single nodes. Tensors must share one device (all backends); indices are range-checked
before any kernel reads with them (on the host by the C++ entries, on the device by the Triton path).

Point convention everywhere: (x, y) in [0, 1] of the padded frame; the bilinear sample of an
h x w map at (x, y) reads pixel centres at ((i + 0.5) / w, (j + 0.5) / h) and counts pixels outside
the map as 0, exactly as `point_sample(input, points, align_corners=False)`; points outside [0, 1]
therefore sample towards 0 (zero padding), as grid_sample does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import has_compiled_op, register_op, resolve, triton_usable


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
    # contiguous(): torch's CPU grid_sample in bf16/fp16 misreads channels-last input (see ms_deform_attn_ref).
    return F.grid_sample(maps.contiguous(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]


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
    # fp32 arithmetic inside (16-bit logits are read and upcast); float64 stays on the reference
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and triton_usable(device)


# One preference list per op (`resolve` never auto-picks Triton for CPU tensors: the interpreter).
_PREFERENCES = {
    op: (("triton", _triton_ok, "Triton kernels"), ("cpu", _cpu_ok(cpu_op), "C++ kernels (csrc/point_mask)"))
    for op, cpu_op in (
        ("point_mask_cost", "point_mask_sample_shared"),
        ("point_mask_loss", "point_mask_loss_fwd"),
        ("sample_uncertain_points", "point_mask_sample_rows"),
    )
}


def _choose(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return resolve(op, backend, device, dtype, _PREFERENCES[op])


# Availability is a property of the process, not of the traced values: torch.compile calls this once
# while tracing and bakes the answer in (what `torch.compiler.assume_constant_result` does, set by hand
# as in ops/ms_deform_attn.py so that importing this module does not import torch._dynamo).
_choose._dynamo_marked_constant = True


def _check_same_device(op: str, ref: torch.Tensor, **tensors) -> None:
    """Every given tensor (None = absent) on `ref`'s device: the rule of the C++ entries, for all backends."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but pred_logits is on {ref.device}")


def _assert_index_range(op: str, name: str, index: torch.Tensor, rows: int) -> None:
    """Reject indices outside [0, rows) before a Triton kernel reads or scatters with them.

    `torch._assert_async` checks on the device without a host synchronisation (CUDA-graph safe): on
    CPU it raises at once; on a GPU a bad index stops the stream with a device-side assert before the
    kernel runs (as an out-of-range index in torch's own indexing does). The C++ entries check on the
    host; the torch reference checks here too (its indexing would wrap negative indices).
    """
    if index.numel():
        torch._assert_async(
            ((index >= 0) & (index < rows)).all(), f"{op}: {name} has a value outside [0, {rows})"
        )


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
    _check_same_device("point_mask_cost", pred_logits, gt_masks=gt_masks, points=points, gt_valid=gt_valid)
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


@torch.library.custom_op("cropformer::point_mask_sample_shared", mutates_args=())
def _sample_shared_op(maps: torch.Tensor, points: torch.Tensor, backend: str) -> torch.Tensor:
    """K x T x H x W maps (float, or uint8 read in place; any strides) at P x 2 points -> K x T x P in
    the points' dtype; backend "cpu" (C++) or "triton" (float32 points)."""
    if backend == "triton":
        from cropformer.kernels.point_mask import sample_shared

        return sample_shared(maps, points)
    return torch.ops.cropformer_C.point_mask_sample_shared(maps, points)


@_sample_shared_op.register_fake
def _(maps, points, backend):
    return maps.new_empty((maps.shape[0], maps.shape[1], points.shape[0]), dtype=points.dtype)


def _cost_fast(pred_logits, gt_masks, points, gt_valid, backend):
    """Fused sampling of logits and compact masks (C++ or Triton) + the same two matmuls."""
    pred, gt, valid = _check_cost_inputs(pred_logits, gt_masks, points, gt_valid)
    # C++: the float64 or float32 of the logits; Triton: float32 arithmetic for every logit dtype
    dtype = _compute_dtype(pred) if backend == "cpu" else torch.float32
    with torch.no_grad():
        pts = points.to(dtype).contiguous()
        if backend == "cpu":
            pred = pred.to(dtype)
        x = _sample_shared_op(pred, pts, backend)
        t = _sample_shared_op(_as_sampleable(gt), pts, backend)
        return _costs_from_samples(x, t, valid)


def _as_sampleable(gt: torch.Tensor) -> torch.Tensor:
    # bool and uint8 share a byte layout: reinterpret, never convert (no copy for any strides).
    return gt.view(torch.uint8) if gt.dtype == torch.bool else gt


def point_mask_cost(pred_logits, gt_masks, points, *, gt_valid=None, backend="auto"):
    """Matching costs on shared points; see `point_mask_cost_ref` for shapes and semantics.

    backend: "auto" | "torch" | "cpu" (C++ sampling, when the extension is built) | "triton" (GPU).
    """
    choice = _choose("point_mask_cost", backend, pred_logits.device, pred_logits.dtype)
    if choice == "torch":
        return point_mask_cost_ref(pred_logits, gt_masks, points, gt_valid)
    return _cost_fast(pred_logits, gt_masks, points, gt_valid, choice)


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
    _check_same_device(
        "point_mask_loss", pred_logits, gt_masks=gt_masks, points=points, pred_index=pred_index, gt_index=gt_index,
        gt_valid=gt_valid,
    )


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
    for name, index, rows in (("pred_index", pred_index, pred_logits), ("gt_index", gt_index, gt_masks)):
        if index is not None:  # torch indexing would wrap negative indices
            _assert_index_range("point_mask_loss", name, index, rows.shape[0])
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


@torch.library.custom_op("cropformer::point_mask_loss_fwd", mutates_args=())
def _loss_fwd_op(
    pred: torch.Tensor, gt: torch.Tensor, points: torch.Tensor, pred_index: torch.Tensor, gt_index: torch.Tensor,
    gt_valid: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bce M, dice M, x M x P, t M x P): the losses and the samples the backward needs.

    "cpu": pred contiguous and in the points' dtype (float32/float64), results in that dtype.
    "triton": any float pred, float32 points and results.
    """
    if backend == "triton":
        from cropformer.kernels.point_mask import loss_fwd

        _assert_index_range("point_mask_loss", "pred_index", pred_index, pred.shape[0])
        _assert_index_range("point_mask_loss", "gt_index", gt_index, gt.shape[0])
        return loss_fwd(pred, gt, points, pred_index, gt_index, gt_valid)
    return tuple(torch.ops.cropformer_C.point_mask_loss_fwd(pred, gt, points, pred_index, gt_index, gt_valid))


@_loss_fwd_op.register_fake
def _(pred, gt, points, pred_index, gt_index, gt_valid, backend):
    m, p = points.shape[:2]
    return points.new_empty(m), points.new_empty(m), points.new_empty(m, p), points.new_empty(m, p)


@torch.library.custom_op("cropformer::point_mask_loss_bwd", mutates_args=())
def _loss_bwd_op(
    grad_bce: torch.Tensor, grad_dice: torch.Tensor, points: torch.Tensor, pred_index: torch.Tensor,
    x: torch.Tensor, t: torch.Tensor, pred_shape: list[int], dtype: torch.dtype, backend: str,
) -> torch.Tensor:
    """Gradient w.r.t. the K x h x w logits, in `dtype` (zero away from the sampled neighbourhoods)."""
    if backend == "triton":
        from cropformer.kernels.point_mask import loss_bwd

        return loss_bwd(grad_bce.float(), grad_dice.float(), points, pred_index, x, t, pred_shape, dtype)
    grad_bce, grad_dice = grad_bce.to(x.dtype).contiguous(), grad_dice.to(x.dtype).contiguous()
    return torch.ops.cropformer_C.point_mask_loss_bwd(grad_bce, grad_dice, points, pred_index, x, t, pred_shape)


@_loss_bwd_op.register_fake
def _(grad_bce, grad_dice, points, pred_index, x, t, pred_shape, dtype, backend):
    return x.new_empty(pred_shape, dtype=dtype)


def _loss_setup_context(ctx, inputs, output):
    pred, _, points, pred_index, _, _, backend = inputs
    ctx.save_for_backward(points, pred_index, output[2], output[3])  # only the points and M x P samples
    ctx.pred_shape, ctx.pred_dtype, ctx.backend = list(pred.shape), pred.dtype, backend


def _loss_backward(ctx, grad_bce, grad_dice, grad_x, grad_t):
    points, pred_index, x, t = ctx.saved_tensors
    grad = _loss_bwd_op(grad_bce, grad_dice, points, pred_index, x, t, ctx.pred_shape, ctx.pred_dtype, ctx.backend)
    return grad, None, None, None, None, None, None


_loss_fwd_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def _loss_fast(pred_logits, gt_masks, points, pred_index, gt_index, gt_valid, backend):
    """The fused forward and backward (C++ or Triton): saves only the points and the M x P samples."""
    m, device = points.shape[0], pred_logits.device
    arange = torch.arange(m, dtype=torch.int64, device=device)
    pred_index = arange if pred_index is None else pred_index.contiguous()
    gt_index = arange if gt_index is None else gt_index.contiguous()
    if gt_valid is None:
        gt_valid = torch.ones(m, dtype=torch.uint8, device=device)
    gt_valid = gt_valid.to(torch.uint8).contiguous()
    if backend == "cpu":
        dtype = _compute_dtype(pred_logits)
        pred = pred_logits.to(dtype).contiguous()  # no copy for the usual contiguous fp32 logits
    else:
        dtype, pred = torch.float32, pred_logits
    pts = points.to(dtype).contiguous()
    bce, dice, _, _ = _loss_fwd_op(pred, _as_sampleable(gt_masks), pts, pred_index, gt_index, gt_valid, backend)
    return bce, dice


def point_mask_loss(pred_logits, gt_masks, points, *, pred_index=None, gt_index=None, gt_valid=None, backend="auto"):
    """Per-pair point losses; see `point_mask_loss_ref` for shapes and semantics.

    backend: "auto" | "torch" | "cpu" (fused C++ forward and backward, when the extension is built) |
    "triton" (fused kernels, GPU; fp32/fp16/bf16 logits, fp32 arithmetic, the gradient in the logits'
    dtype). The fused paths are the custom ops `torch.ops.cropformer.point_mask_loss_fwd` / `_bwd`
    (fake implementations, registered autograd: one node each under torch.compile) and keep only the
    points and the M x P samples for the backward. Every index must lie in its range (ValueError or
    RuntimeError otherwise, never an out-of-bounds read).
    """
    _check_loss_inputs(pred_logits, gt_masks, points, pred_index, gt_index, gt_valid)
    choice = _choose("point_mask_loss", backend, pred_logits.device, pred_logits.dtype)
    if choice == "torch":
        return point_mask_loss_ref(
            pred_logits, gt_masks, points, pred_index=pred_index, gt_index=gt_index, gt_valid=gt_valid
        )
    return _loss_fast(pred_logits, gt_masks, points, pred_index, gt_index, gt_valid, choice)


# --------------------------------------------------------------------------------------------------
# sample_uncertain_points


@torch.library.custom_op("cropformer::point_mask_sample_rows", mutates_args=())
def _sample_rows_op(maps: torch.Tensor, index: torch.Tensor, points: torch.Tensor, backend: str) -> torch.Tensor:
    """Row index[m] of K x h x w maps at its own points M x S x 2 (float32) -> M x S float32;
    "cpu": contiguous float32 maps, "triton": any float maps and strides."""
    if backend == "triton":
        from cropformer.kernels.point_mask import sample_rows

        _assert_index_range("sample_uncertain_points", "index", index, maps.shape[0])
        return sample_rows(maps, index, points)
    return torch.ops.cropformer_C.point_mask_sample_rows(maps, index, points)


@_sample_rows_op.register_fake
def _(maps, index, points, backend):
    return points.new_empty(points.shape[:2])


def _sample_candidates(logits, index, candidates, backend):
    """M x S float32 logits at the candidate points (no gradient)."""
    choice = _choose("sample_uncertain_points", backend, logits.device, logits.dtype)
    if choice == "torch":
        if index is not None:  # torch indexing would wrap negative indices
            _assert_index_range("sample_uncertain_points", "index", index, logits.shape[0])
        return _sample_logits_rows(logits, index, candidates, torch.float32)
    index = torch.arange(candidates.shape[0], device=logits.device) if index is None else index.contiguous()
    if choice == "cpu":
        logits = logits.float().contiguous()  # no copy for the usual contiguous fp32 logits
    return _sample_rows_op(logits, index, candidates.contiguous(), choice)


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
    if index is not None:
        if index.dim() != 1 or index.dtype != torch.int64 or index.device != logits.device:
            raise ValueError(
                f"sample_uncertain_points: index must be a 1-D int64 tensor on {logits.device}, got "
                f"{index.dtype} {tuple(index.shape)} on {index.device}"
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


# --------------------------------------------------------------------------------------------------
# Self-tests of the fast paths (run by `_dispatch` before a backend is trusted on a device and dtype):
# a small random problem of odd sizes through `backend`, compared with the float64 reference on the
# same (dtype-rounded) inputs, forward and gradient; torch.testing.assert_close raises on a mismatch.
# The kernels compute in fp32 for every dtype but float64, so values are held to fp32 accuracy; the
# gradient is returned in the logits' dtype, so it is held to that dtype's rounding.

_VALUE_TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-4, 1e-5), torch.float16: (1e-4, 1e-5),
              torch.bfloat16: (1e-4, 1e-5)}
_GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _expect_close(op, backend, device, dtype, name, actual, expected, rtol, atol):
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol, atol=atol,
        msg=lambda m: f"{op} self-test ({backend}, {device}, {dtype}), {name}: {m}",
    )


def _selftest_inputs(device, dtype, seed):
    """Logits 7 x 9 x 11 (dtype-rounded), masks 5 x 29 x 37 bool, points 13 x 2 partly outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(7, 9, 11, generator=g) * 3).to(dtype)
    masks = torch.rand(5, 29, 37, generator=g) > 0.5
    points = torch.rand(13, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    return logits.to(device), masks.to(device), points.to(_compute_dtype(logits)).to(device)


def _selftest_cost(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    logits, masks, points = _selftest_inputs(device, dtype, 0)
    pred, gt = logits.view(7, 1, 9, 11), masks[:, None]
    got = point_mask_cost(pred, gt, points, backend=backend)
    expected = point_mask_cost_ref(pred.double(), gt, points.double())
    for name, a, e in zip(("bce", "dice"), got, expected):
        _expect_close("point_mask_cost", backend, device, dtype, name, a, e, *_VALUE_TOL[dtype])


def _selftest_loss(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    logits, masks, points = _selftest_inputs(device, dtype, 1)
    g = torch.Generator().manual_seed(2)
    m = 6
    pts = (torch.rand(m, 17, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1).to(points.dtype).to(device)
    pred_index = torch.tensor([3, 0, 3, 6, 1, 5], device=device)  # a repeated row: its gradients add up
    gt_index = torch.tensor([4, 4, 0, 2, 1, 3], device=device)
    valid = torch.tensor([True, True, False, True, True, True], device=device)
    weights = torch.rand(2, m, generator=g, dtype=torch.float64).to(device)
    results = []
    for fn, inp in ((point_mask_loss, logits), (point_mask_loss_ref, logits.double())):
        inp = inp.detach().requires_grad_(True)
        kwargs = dict(pred_index=pred_index, gt_index=gt_index, gt_valid=valid)
        if fn is point_mask_loss:
            kwargs["backend"] = backend
        bce, dice = fn(inp, masks, pts, **kwargs)
        ((bce.double() * weights[0]).sum() + (dice.double() * weights[1]).sum()).backward()
        results.append((bce, dice, inp.grad))
    (bce, dice, grad), (exp_bce, exp_dice, exp_grad) = results
    _expect_close("point_mask_loss", backend, device, dtype, "bce", bce, exp_bce, *_VALUE_TOL[dtype])
    _expect_close("point_mask_loss", backend, device, dtype, "dice", dice, exp_dice, *_VALUE_TOL[dtype])
    rtol = _GRAD_RTOL[dtype]
    scale = float(exp_grad.abs().max())
    _expect_close("point_mask_loss", backend, device, dtype, "grad", grad, exp_grad, rtol, rtol * scale)


def _selftest_uncertain(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    # The sampled candidate logits (float32 on every path, as the original's uncertainty); which
    # candidates win the top-k is torch's topk on them.
    logits, _, _ = _selftest_inputs(device, dtype, 3)
    index = torch.tensor([2, 2, 6, 0, 5], device=device)
    candidates = torch.rand(5, 23, 2, generator=torch.Generator().manual_seed(4)).to(device)
    got = _sample_candidates(logits, index, candidates, backend)
    expected = _sample_logits_rows(logits.double(), index, candidates.double(), torch.float64)
    _expect_close(
        "sample_uncertain_points", backend, device, dtype, "samples", got, expected, *_VALUE_TOL[torch.float32]
    )


register_op("point_mask_cost", _PREFERENCES["point_mask_cost"], _selftest_cost)
register_op("point_mask_loss", _PREFERENCES["point_mask_loss"], _selftest_loss)
register_op("sample_uncertain_points", _PREFERENCES["sample_uncertain_points"], _selftest_uncertain)
