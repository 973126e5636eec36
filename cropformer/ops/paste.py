"""Fused multi-view paste of entity masks into one non-overlapping id map (SPEC.md section 5.3-5.6).

`paste_entities` is the one dispatch point; `paste_entities_ref` is the readable torch reference (the
definition of correctness). Fast paths: C++ (OpenMP) on CPU and CUDA on GPU, both in `csrc/paste/`
with the per-pixel math shared in `csrc/paste/paste.h`, and Triton (`kernels/paste.py`) on GPU when the
CUDA extension is not built.

What is computed (the released CropFormer's `inference_whole_views`, and the Mask2Former baseline with
one view): for each view v, its mask logits (at 1/4 of the padded network input) are resized bilinearly
(align_corners=False) by 4 to the padded size, cut to the view's resized size, resized bilinearly to the
view's footprint in the output, and passed through a sigmoid. Each output pixel's fused probability is
the unweighted mean over the views covering it. A query is on at a pixel where that mean exceeds
`mask_threshold`; among the queries that are on, the one with the highest class score wins the pixel
(the original paints masks in ascending class score). Ties in class score: the lower query index wins
(the original's order for ties is whatever `torch.sort` gives).

The fast paths never hold a full-resolution map per query. The two resizes of one axis compose into
at most 3 consecutive low-resolution rows (columns) per output row (column) with fixed weights
(`_axis_taps`), so a view's logit at a pixel is a convex combination of at most 9 low-resolution
logits. The output is cut into tiles whose edges include every footprint edge (so one set of views
covers each tile). Per tile, the minimum and maximum low-resolution logits over the tile's support bound
the fused probability of every query there; queries that cannot reach the threshold are dropped, and
the list ends at the first query that is on over the whole tile. Each pixel then evaluates the
survivors in descending class score and stops at the first that is on.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Sequence

import torch

from ._dispatch import has_compiled_op, has_cuda_kernels, register_op, resolve, triton_usable

SCORE_MODES = ("mean_prob", "original")
STRIDE = 4  # mask logits are at 1/4 of the padded network input


# ----------------------------------------------------------------------------------------------------
# Geometry: PyTorch's bilinear resize (align_corners=False) as taps, and its composition.


def _linear_taps(in_size: int, out_size: int, index: torch.Tensor | None = None):
    """Source taps of ATen's 1-D linear resize, align_corners=False, for float32 inputs.

    Follows `compute_source_index_and_lambda` in ATen/native/UpSample.h, with the float32 arithmetic
    ATen uses for float32 tensors: scale = float32(in) / out, src = scale * (dst + 0.5) - 0.5 clamped
    at 0, i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1), lambda1 = src - i0, lambda0 =
    1 - lambda1; an equal size copies. ATen's CPU kernels are compiled with FMA contraction, so src is
    rounded to float32 once (computed exactly in float64, then rounded): this reproduces
    F.interpolate's weights bit for bit (checked in tests/ops/test_paste.py), where rounding the
    product first would be off by one float32 ulp of src (up to 1e-5 in the weights).

    Args:
        index: output positions (int64); default all of range(out_size).
    Returns:
        (i0, i1) int64 and (lambda0, lambda1) float32, each of index's length; output position d is
        lambda0[d] * x[i0[d]] + lambda1[d] * x[i1[d]].
    """
    dst = torch.arange(out_size, dtype=torch.int64) if index is None else index.to(torch.int64)
    if in_size == out_size:
        return dst, dst, torch.ones(dst.shape), torch.zeros(dst.shape)
    scale = (torch.tensor(in_size, dtype=torch.float32) / out_size).double()
    src = (scale * (dst.double() + 0.5) - 0.5).to(torch.float32).clamp_min(0)
    i0 = src.floor().to(torch.int64).clamp_max(in_size - 1)
    lambda1 = (src - i0.to(torch.float32)).clamp(0, 1)
    i1 = i0 + (i0 < in_size - 1).to(torch.int64)
    return i0, i1, 1 - lambda1, lambda1


def _resize_matrix(in_size: int, out_size: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """len(index) x in_size float64 matrix of the 1-D resize (rows = the output positions in index)."""
    i0, i1, l0, l1 = _linear_taps(in_size, out_size, index)
    m = torch.zeros(i0.numel(), in_size, dtype=torch.float64)
    rows = torch.arange(i0.numel())
    m.index_put_((rows, i0), l0.double(), accumulate=True)
    m.index_put_((rows, i1), l1.double(), accumulate=True)
    return m


def _axis_matrix(low: int, cut: int, out: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """One axis of a view: low-res -> x4 (padded size) -> cut to `cut` -> resize to `out`.

    Returns len(index) x low float64: the composition of both resizes (rows = output positions).
    """
    step1 = _resize_matrix(low, STRIDE * low)[:cut]  # cut x low
    return _resize_matrix(cut, out, index) @ step1


def _axis_taps(low: int, cut: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same composition as `_axis_matrix`, as 3 taps per output position (fast paths).

    Two resize taps per step give 4 (index, weight) pairs per output position; they fall on at most 3
    consecutive low-res positions (the x4 step moves by 1/4 low-res pixel per padded pixel), so they
    are summed into slots base, base+1, base+2 with base = min(i, low - 3) (0 when low < 3; slots past
    the end repeat the last index with weight 0).

    Returns:
        idx: out x 3 int32 (non-decreasing along the output, used by the tile bounds),
        weight: out x 3 float32 (non-negative, summing to 1 up to rounding).
    """
    a0, a1, l0, l1 = _linear_taps(cut, out)
    idx_pairs, w_pairs = [], []
    for a, la in ((a0, l0), (a1, l1)):
        b0, b1, m0, m1 = _linear_taps(low, STRIDE * low, a)
        idx_pairs += [b0, b1]
        w_pairs += [la.double() * m0.double(), la.double() * m1.double()]
    idx = torch.stack(idx_pairs, 1)  # out x 4
    wts = torch.stack(w_pairs, 1)
    base = idx[:, 0].clamp_max(max(low - 3, 0))
    slot = idx - base[:, None]
    assert int(slot.min()) >= 0 and int(slot.max()) <= 2, "composed taps span more than 3 low-res positions"
    weight = torch.zeros(out, 3, dtype=torch.float64).scatter_add_(1, slot, wts)
    taps = (base[:, None] + torch.arange(3)).clamp_max(low - 1)
    return taps.to(torch.int32), weight.to(torch.float32)


def _rank_order(class_scores: torch.Tensor) -> torch.Tensor:
    """Query ids by descending class score; equal scores keep ascending query index (on the scores'
    device: no host synchronisation)."""
    return torch.sort(class_scores.detach().double(), descending=True, stable=True).indices


def _tile_breaks(length: int, edges: Sequence[int], tile: int) -> torch.Tensor:
    """Tile edges along one axis: every footprint edge, then each interval split into near-equal
    pieces of at most `tile` pixels."""
    cuts = sorted({0, length, *(int(e) for e in edges if 0 < e < length)})
    out = [0]
    for a, b in zip(cuts[:-1], cuts[1:]):
        n = -(-(b - a) // tile)
        out += [a + ((b - a) * i) // n for i in range(1, n + 1)]
    return torch.tensor(out, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------
# Input checks (shared by the reference and the fast paths).


def _int_rows(value, cols: int, name: str) -> list[list[int]]:
    """Rows of `cols` Python ints from a nested sequence or an integer tensor (read on the host)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            raise ValueError(f"{name} must hold integers, got {value.dtype}")
        value = value.tolist()
    try:
        rows = [[operator.index(v) for v in row] for row in value]
    except TypeError as exc:
        raise ValueError(f"{name} must be rows of {cols} integers ({exc})") from None
    if any(len(row) != cols for row in rows):
        raise ValueError(f"{name} must be rows of {cols} integers, got {value}")
    return rows


def _check_inputs(view_logits, view_sizes, view_boxes, class_scores, out_size, mask_threshold, score_mode):
    """Validate and return (sizes, boxes, H, W) as plain Python ints; raise ValueError with the reason.

    Reads only metadata and the host-side geometry (sizes, boxes and out_size: Python ints or CPU
    tensors), so it never waits for the device.
    """
    if not isinstance(view_logits, torch.Tensor) or view_logits.dim() != 4:
        got = getattr(view_logits, "shape", type(view_logits))
        raise ValueError(f"view_logits must be a V x Q x h x w tensor, got {got}")
    if not view_logits.is_floating_point():
        raise ValueError(f"view_logits must be floating point, got {view_logits.dtype}")
    V, Q, h, w = view_logits.shape
    if min(V, Q, h, w) < 1:
        raise ValueError(f"view_logits must not be empty, got shape {tuple(view_logits.shape)}")
    if len(out_size) != 2:
        raise ValueError(f"out_size must be (H, W), got {out_size}")
    H, W = (int(s) for s in out_size)
    if H < 1 or W < 1:
        raise ValueError(f"out_size must be positive, got {(H, W)}")
    sizes = _int_rows(view_sizes, 2, "view_sizes")
    boxes = _int_rows(view_boxes, 4, "view_boxes")
    if len(sizes) != V:
        raise ValueError(f"view_sizes must be V x 2 = {V} x 2 (rows, cols), got {len(sizes)} rows")
    if len(boxes) != V:
        raise ValueError(f"view_boxes must be V x 4 = {V} x 4 (x0, y0, x1, y1), got {len(boxes)} rows")
    for v, ((rows, cols), (x0, y0, x1, y1)) in enumerate(zip(sizes, boxes)):
        if not (1 <= rows <= STRIDE * h and 1 <= cols <= STRIDE * w):
            raise ValueError(
                f"view {v}: size {(rows, cols)} must lie within the padded size {(STRIDE * h, STRIDE * w)} "
                f"(= {STRIDE} x the logits' {h} x {w})"
            )
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise ValueError(
                f"view {v}: box (x0, y0, x1, y1) = {(x0, y0, x1, y1)} must be non-empty and inside the output "
                f"{W} x {H} (W x H)"
            )
    if not isinstance(class_scores, torch.Tensor) or class_scores.shape != (Q,):
        got = tuple(class_scores.shape) if isinstance(class_scores, torch.Tensor) else type(class_scores).__name__
        raise ValueError(f"class_scores must be a tensor of shape (Q,) = ({Q},), got {got}")
    if not math.isfinite(float(mask_threshold)):
        raise ValueError(f"mask_threshold must be finite, got {mask_threshold}")
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    return sizes, boxes, H, W


def _scores(class_scores: torch.Tensor, prob_sum: torch.Tensor, area: torch.Tensor, score_mode: str) -> torch.Tensor:
    """Final score per query from the sums over its final mask (float64 in, float32 out).

    mean_prob: class score x mean fused probability. original: class score x sum(sigmoid(p)) /
    (area + 1e-6), as the released code computes it. Empty masks score 0 in both.
    """
    cls = class_scores.detach().to(prob_sum.device, torch.float64)
    area = area.to(torch.float64)
    if score_mode == "original":
        mean = prob_sum / (area + 1e-6)
    else:
        mean = prob_sum / area.clamp_min(1)
    return torch.where(area > 0, cls * mean, torch.zeros_like(mean)).to(torch.float32)


# ----------------------------------------------------------------------------------------------------
# Reference.


def paste_entities_ref(
    view_logits: torch.Tensor,
    view_sizes,
    view_boxes,
    class_scores: torch.Tensor,
    out_size: Sequence[int],
    mask_threshold: float = 0.5,
    score_mode: str = "mean_prob",
    *,
    query_chunk: int = 16,
    chunk_elems: int = 1 << 22,
):
    """Readable float64 reference, the definition of correctness; see `paste_entities` for arguments.

    Chunked over output rows and queries (at most about `chunk_elems` fused values at a time), so it
    runs on large outputs with bounded memory; each view's two resizes are applied as dense 1-D
    matrices (`_axis_matrix`) restricted to the chunk's rows.
    """
    sizes, boxes, H, W = _check_inputs(
        view_logits, view_sizes, view_boxes, class_scores, out_size, mask_threshold, score_mode
    )
    V, Q, h, w = view_logits.shape
    device = view_logits.device
    logits = view_logits.detach().to(torch.float64)
    order = _rank_order(class_scores).to(device)
    # Per view: columns of its footprint as a (x1 - x0) x w matrix.
    col_mats = [
        _axis_matrix(w, cols, x1 - x0).to(device) for (rows, cols), (x0, y0, x1, y1) in zip(sizes, boxes)
    ]
    id_map = torch.zeros(H, W, dtype=torch.int32, device=device)
    prob_sum = torch.zeros(Q, dtype=torch.float64, device=device)
    area = torch.zeros(Q, dtype=torch.int64, device=device)
    qc = min(query_chunk, Q)
    step = max(1, chunk_elems // (qc * W))
    for r0 in range(0, H, step):
        r1 = min(H, r0 + step)
        count = torch.zeros(r1 - r0, W, dtype=torch.float64, device=device)
        for x0, y0, x1, y1 in boxes:
            count[max(r0, y0) - r0 : max(min(r1, y1) - r0, 0), x0:x1] += 1
        # The original divides by (count + 1e-16): equal to count wherever count >= 1, and uncovered
        # pixels get 0 either way.
        count = count.clamp_min(1)
        # Per view overlapping these rows: (its rows ya..yb, their (yb - ya) x h matrix).
        row_mats = {}
        for v, ((rows, cols), (x0, y0, x1, y1)) in enumerate(zip(sizes, boxes)):
            ya, yb = max(r0, y0), min(r1, y1)
            if ya < yb:
                row_mats[v] = (ya, yb, _axis_matrix(h, rows, y1 - y0, torch.arange(ya - y0, yb - y0)).to(device))
        win_rank = torch.full((r1 - r0, W), Q, dtype=torch.int64, device=device)  # Q = no entity yet
        win_prob = torch.zeros(r1 - r0, W, dtype=torch.float64, device=device)
        for c0 in range(0, Q, qc):  # queries in descending class score
            queries = order[c0 : c0 + qc]
            fused = torch.zeros(len(queries), r1 - r0, W, dtype=torch.float64, device=device)
            for v, (ya, yb, row_mat) in row_mats.items():
                x0, x1 = boxes[v][0], boxes[v][2]
                # (yb - ya) x h @ q x h x w @ w x (x1 - x0) -> q x (yb - ya) x (x1 - x0)
                view_logit = row_mat @ logits[v, queries] @ col_mats[v].T
                fused[:, ya - r0 : yb - r0, x0:x1] += view_logit.sigmoid()
            fused /= count
            on = fused > mask_threshold
            first = on.to(torch.uint8).argmax(0)  # first query that is on, in rank order
            take = on.any(0) & (win_rank == Q)
            win_rank[take] = c0 + first[take]
            win_prob[take] = fused.gather(0, first[None])[0][take]
        has = win_rank < Q
        query = order[win_rank.clamp_max(Q - 1)][has]
        id_map[r0:r1][has] = (query + 1).to(torch.int32)
        area += torch.bincount(query, minlength=Q)
        term = win_prob[has] if score_mode == "mean_prob" else win_prob[has].sigmoid()
        prob_sum += torch.bincount(query, weights=term, minlength=Q)
    return id_map, _scores(class_scores, prob_sum, area, score_mode).to(device), area


# ----------------------------------------------------------------------------------------------------
# Fast paths.


def _plan(sizes, boxes, h: int, w: int, H: int, W: int, tile: int):
    """Per-view taps in output coordinates and tile edges for the compiled kernels (CPU tensors).

    Returns row_idx/row_w (V x H x 3), col_idx/col_w (V x W x 3) (zero outside each footprint, never
    read there), boxes (V x 4 int32), row_breaks, col_breaks.
    """
    V = len(sizes)
    row_idx = torch.zeros(V, H, 3, dtype=torch.int32)
    row_w = torch.zeros(V, H, 3, dtype=torch.float32)
    col_idx = torch.zeros(V, W, 3, dtype=torch.int32)
    col_w = torch.zeros(V, W, 3, dtype=torch.float32)
    for v, ((rows, cols), (x0, y0, x1, y1)) in enumerate(zip(sizes, boxes)):
        row_idx[v, y0:y1], row_w[v, y0:y1] = _axis_taps(h, rows, y1 - y0)
        col_idx[v, x0:x1], col_w[v, x0:x1] = _axis_taps(w, cols, x1 - x0)
    row_breaks = _tile_breaks(H, [e for b in boxes for e in (b[1], b[3])], tile)
    col_breaks = _tile_breaks(W, [e for b in boxes for e in (b[0], b[2])], tile)
    return row_idx, row_w, col_idx, col_w, torch.tensor(boxes, dtype=torch.int32), row_breaks, col_breaks


def _compiled_usable(device: torch.device, kind: str) -> bool:
    if not has_compiled_op("paste_entities"):
        return False
    if kind == "cpu":
        return device.type == "cpu"
    return device.type == "cuda" and has_cuda_kernels()


# Auto: CUDA, then Triton on a GPU; C++ on CPU. Triton on CPU (interpreter) only when asked for.
_PREFERENCE = (
    ("cuda", lambda d, t: _compiled_usable(d, "cuda"), "CUDA kernel"),
    ("cpu", lambda d, t: _compiled_usable(d, "cpu"), "C++ OpenMP kernel"),
    ("triton", lambda d, t: triton_usable(d), "Triton kernels"),
)

# Tile side per backend: small tiles prune finely; each tile costs one pass over its support per
# query. Triton: the kernel's fixed TILE (32).
_TILE = {"cpu": 64, "cuda": 32, "triton": 32}


@functools.lru_cache(maxsize=8)
def _device_plan(sizes: tuple, boxes: tuple, h: int, w: int, H: int, W: int, tile: int, device: torch.device):
    """`_plan` on `device`, cached per geometry: repeated calls (video, a fixed input size, CUDA-graph
    capture after a warm-up call) copy nothing to the device. At most 8 geometries are kept (about
    1.7 MB each for 5 views of an 8000 x 6000 output)."""
    return tuple(t.to(device) for t in _plan(sizes, boxes, h, w, H, W, tile))


def _paste_kernels(view_logits, sizes, boxes, class_scores, H, W, mask_threshold, score_mode, backend):
    """Run a fast path ("cpu", "cuda" or "triton"): (id_map, scores, areas, pairs evaluated (1,) int64),
    all on the logits' device, without a host synchronisation."""
    V, Q, h, w = view_logits.shape
    device = view_logits.device
    key = tuple(map(tuple, sizes)), tuple(map(tuple, boxes))
    plan = _device_plan(*key, h, w, H, W, _TILE[backend], device)
    order = _rank_order(class_scores).to(device, torch.int32)
    args = (view_logits.detach().to(torch.float32).contiguous(), *plan, order, float(mask_threshold),
            SCORE_MODES.index(score_mode))
    if backend == "triton":
        from cropformer.kernels.paste import paste_entities_fwd

        id_map, prob_sum, area, evaluated = paste_entities_fwd(*args)
    else:
        id_map, prob_sum, area, evaluated = torch.ops.cropformer_C.paste_entities(*args)
    return id_map, _scores(class_scores, prob_sum, area, score_mode), area, evaluated


def _paste_fast(view_logits, sizes, boxes, class_scores, H, W, mask_threshold, score_mode, backend):
    """`_paste_kernels` with the number of (pixel, query) pairs evaluated as an int (for tests and
    benchmarks of the pruning; reading it waits for the device)."""
    id_map, scores, area, evaluated = _paste_kernels(
        view_logits, sizes, boxes, class_scores, H, W, mask_threshold, score_mode, backend
    )
    return id_map, scores, area, int(evaluated.item())


@torch.library.custom_op("cropformer::paste_entities", mutates_args=())
def _paste_op(
    view_logits: torch.Tensor, class_scores: torch.Tensor, view_sizes: list[int], view_boxes: list[int],
    out_size: list[int], mask_threshold: float, score_mode: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`paste_entities` with a resolved backend and the geometry flattened (V x 2 sizes, V x 4 boxes):
    one opaque node for torch.compile, whatever the backend (the reference loops over row chunks)."""
    V = view_logits.shape[0]
    sizes = [view_sizes[2 * v : 2 * v + 2] for v in range(V)]
    boxes = [view_boxes[4 * v : 4 * v + 4] for v in range(V)]
    H, W = out_size
    if backend == "torch":
        return paste_entities_ref(view_logits, sizes, boxes, class_scores, (H, W), mask_threshold, score_mode)
    id_map, scores, area, _ = _paste_kernels(
        view_logits, sizes, boxes, class_scores, H, W, mask_threshold, score_mode, backend
    )
    return id_map, scores, area


@_paste_op.register_fake
def _(view_logits, class_scores, view_sizes, view_boxes, out_size, mask_threshold, score_mode, backend):
    Q = view_logits.shape[1]
    return (view_logits.new_empty(out_size, dtype=torch.int32), view_logits.new_empty(Q, dtype=torch.float32),
            view_logits.new_empty(Q, dtype=torch.int64))


def _choose(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return resolve("paste_entities", backend, device, dtype, _PREFERENCE)


# A property of the process, not of traced values: torch.compile bakes the answer in (see ops/point_mask.py).
_choose._dynamo_marked_constant = True


def paste_entities(
    view_logits: torch.Tensor,
    view_sizes,
    view_boxes,
    class_scores: torch.Tensor,
    out_size: Sequence[int],
    mask_threshold: float = 0.5,
    score_mode: str = "mean_prob",
    backend: str = "auto",
):
    """Fuse V views' mask logits into one non-overlapping entity id map at output resolution.

    Args:
        view_logits: V x Q x h x w mask logits at 1/4 of the padded network input shared by the views
            (the padded size is 4h x 4w). Any float dtype; the fast paths compute in float32.
        view_sizes: V x 2 ints, each view's resized, unpadded size (rows, cols) in network-input pixels.
        view_boxes: V x 4 ints, each view's footprint (x0, y0, x1, y1) in output pixels, x1/y1
            exclusive; must lie inside the output. For CropFormer: the full view covers the output,
            the crops their crop boxes; Mask2Former: one view covering the output. Sizes and boxes are
            host-side geometry: Python ints (constants under torch.compile) or CPU tensors.
        class_scores: Q tensor, the entity probability of each query (decides who wins a pixel).
        out_size: (H, W) of the output.
        mask_threshold: a query is on where its fused probability is > this.
        score_mode: "mean_prob" (ours): class score x mean fused probability over the final mask;
            "original" (parity with the released code): class score x sum(sigmoid(fused probability))
            / (area + 1e-6), the double sigmoid.
        backend: "auto" | "torch" | "cpu" | "cuda" | "triton" (see `cropformer.ops._dispatch.resolve`;
            auto: CUDA kernel, else Triton, on GPU; C++ kernel on CPU; else the torch reference).

    Returns:
        id_map: H x W int32, 0 = no entity, k = query k - 1. Pixels covered by no view are 0.
        scores: Q float32, 0 for queries with no pixel.
        areas: Q int64 pixel counts of the final masks.

    Fused probability per pixel = mean over covering views of sigmoid(resized logit); ties in class
    score go to the lower query index. Raises ValueError on bad inputs (boxes outside the output,
    mismatched V or Q, an empty output). Not differentiable. Runs as the custom op
    `torch.ops.cropformer.paste_entities` (a fake implementation gives the output shapes), so
    `torch.compile(fullgraph=True)` of post-processing keeps one graph. On a GPU the fast paths
    never wait for the device: the query order is sorted there and each geometry's plan is copied
    once (`_device_plan`).
    """
    sizes, boxes, H, W = _check_inputs(
        view_logits, view_sizes, view_boxes, class_scores, out_size, mask_threshold, score_mode
    )
    choice = _choose(backend, view_logits.device, view_logits.dtype)
    return _paste_op(
        view_logits.detach(), class_scores.detach(), [v for s in sizes for v in s], [v for b in boxes for v in b],
        [H, W], float(mask_threshold), score_mode, choice,
    )


# ----------------------------------------------------------------------------------------------------
# Self-test of the fast paths (run by `_dispatch` before a backend is trusted on a device and dtype).


def _selftest_problem(device: torch.device, dtype: torch.dtype):
    """A fixed small problem: 2 views (full image + a crop at the border), 5 queries with distinct
    scores, 7 x 9 logits, a 23 x 29 output. Every fused probability lies at least 5e-4 from the
    threshold 0.5 (checked in tests/ops/test_paste.py; float32 rounding moves them by ~1e-6), so the
    float32 kernels must reproduce the float64 reference's id map exactly."""
    g = torch.Generator().manual_seed(31)
    logits = (torch.randn(2, 5, 7, 9, generator=g) * 4).to(dtype)
    sizes = [[27, 36], [25, 33]]
    boxes = [[0, 0, 29, 23], [12, 9, 29, 23]]
    scores = torch.tensor([0.3, 0.9, 0.5, 0.7, 0.1])
    return logits.to(device), sizes, boxes, scores.to(device), (23, 29)


def _selftest(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    logits, sizes, boxes, scores, out_size = _selftest_problem(device, dtype)
    for score_mode in SCORE_MODES:
        id_map, sc, area = paste_entities(logits, sizes, boxes, scores, out_size, score_mode=score_mode,
                                          backend=backend)
        exp_id, exp_sc, exp_area = paste_entities_ref(logits.double(), sizes, boxes, scores, out_size,
                                                      score_mode=score_mode)
        where = f"paste_entities self-test ({backend}, {device}, {dtype}, {score_mode})"
        diff = id_map.cpu() != exp_id.cpu()
        if diff.any():
            raise AssertionError(f"{where}: {int(diff.sum())} pixels differ, first {diff.nonzero()[:3].tolist()}")
        torch.testing.assert_close(area.cpu(), exp_area.cpu(), rtol=0, atol=0, msg=lambda m: f"{where}, areas: {m}")
        torch.testing.assert_close(sc.double().cpu(), exp_sc.double().cpu(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{where}, scores: {m}")


register_op("paste_entities", _PREFERENCE, _selftest)
