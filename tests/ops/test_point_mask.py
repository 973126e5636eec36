"""Parity of cropformer.ops.point_mask (costs, losses, importance sampling) with the original's
composition: detectron2 `point_sample` (grid_sample on FLOAT ground truth) + Mask2Former's
`batch_sigmoid_ce_loss` / `batch_dice_loss` / `sigmoid_ce_loss` / `dice_loss`, written out here in
float64. The C++ backend runs when the extension is built or JIT-loaded
(`CROPFORMER_JIT_OPS=point_mask python -m pytest tests/ops/test_point_mask.py`); the Triton kernels
run on CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it unless given) and compiled on a GPU
(`TRITON_INTERPRET=0 python -m pytest tests/ops/test_point_mask.py -m gpu`).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from cropformer.ops import point_mask as pm
from cropformer.ops._dispatch import has_compiled_op, triton_usable
from tests.conftest import assert_close, cuda_or_skip, spy_device_guard, triton_device_or_skip

BACKENDS = ["torch", "cpu", "triton"]
# fp32 against the float64 composition; float64 against float64 (the same math, other order)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


# The Triton kernels compute in fp32: float64 has no Triton path (refused when asked for, see
# test_triton_refuses_float64), so those pairs are not generated rather than skipped.
BACKEND_DTYPES = [(b, d) for d in (torch.float32, torch.float64) for b in BACKENDS
                  if not (b == "triton" and d == torch.float64)]


def _backend_or_skip(backend, dtype=torch.float32):
    if backend == "cpu" and not has_compiled_op("point_mask_loss_fwd"):
        pytest.skip("C++ point_mask ops not built (set CROPFORMER_JIT_OPS=point_mask)")
    if backend == "triton":
        if not triton_usable(torch.device("cpu")):
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
        assert dtype != torch.float64, "no Triton path in float64: not a generated case"


def test_triton_refuses_float64():
    """An explicit Triton backend in float64 is an error naming why (never a silent fp32 computation);
    `auto` keeps float64 on the reference."""
    _backend_or_skip("triton")
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    gt = torch.rand(2, 9, 11, generator=g) > 0.5
    pts = torch.rand(13, 2, generator=g, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="triton"):
        pm.point_mask_cost(pred, gt, pts, backend="triton")
    bce, dice = pm.point_mask_cost(pred, gt, pts, backend="auto")
    assert bce.dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# the original's composition, float64


def ref_point_sample(maps, points):
    """maps K x C x H x W float64, points K x P x 2 -> K x C x P (detectron2 point_sample)."""
    return F.grid_sample(maps, 2.0 * points[:, :, None] - 1.0, align_corners=False)[..., 0]


def ref_cost(pred, gt, points, valid=None):
    """pred Q x T x h x w, gt N x T x H x W (any dtype), points P x 2 -> (bce, dice) Q x N float64."""
    q, n = pred.shape[0], gt.shape[0]
    pts = points.double()
    tgt = gt.double()
    if valid is not None:
        tgt = tgt * valid[:, :, None, None].double()
    t = ref_point_sample(tgt, pts[None].expand(n, -1, -1)).flatten(1)
    x = ref_point_sample(pred.double(), pts[None].expand(q, -1, -1)).flatten(1)
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    bce = (torch.einsum("nc,mc->nm", pos, t) + torch.einsum("nc,mc->nm", neg, 1 - t)) / x.shape[1]
    s = x.sigmoid()
    dice = 1 - (2 * torch.einsum("nc,mc->nm", s, t) + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    return bce, dice


def ref_loss(pred, gt, points, valid=None):
    """pred M x h x w (float64, may require grad), gt M x H x W, points M x P x 2 -> (bce M, dice M)."""
    t = ref_point_sample(gt.double()[:, None], points.double())[:, 0]
    if valid is not None:
        t = t * valid[:, None].double()
    x = ref_point_sample(pred[:, None], points.double())[:, 0]
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)
    s = x.sigmoid()
    dice = 1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)
    return bce, dice


def ref_uncertain_points(logits, num_points, oversample_ratio, importance_sample_ratio, generator):
    """detectron2 get_uncertain_point_coords_with_randomness with calculate_uncertainty = -|logit|."""
    m = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(m, num_sampled, 2, generator=generator)
    unc = -ref_point_sample(logits[:, None].float(), coords).abs()
    k = int(importance_sample_ratio * num_points)
    idx = torch.topk(unc[:, 0, :], k=k, dim=1)[1]
    idx = idx + num_sampled * torch.arange(m)[:, None]
    coords = coords.view(-1, 2)[idx.view(-1), :].view(m, k, 2)
    if num_points - k > 0:
        coords = torch.cat([coords, torch.rand(m, num_points - k, 2, generator=generator)], dim=1)
    return coords


# ------------------------------------------------------------------------------------------------
# inputs


def make_masks(n, t, h, w, g, dtype=torch.bool, special=True):
    """Random blobs, plus (when there are enough rows) an empty and a full mask."""
    low = torch.rand(n, t, (h + 7) // 8, (w + 7) // 8, generator=g)
    masks = F.interpolate(low, size=(h, w), mode="nearest") > 0.5
    if special and n >= 3:
        masks[0] = False
        masks[1] = True
    return masks.to(dtype)


def make_points(p, g, dtype, h, w, H, W):
    """P uniform points whose last ones are the awkward cases: borders, corners, exact pixel centres
    of the prediction grid (h x w) and of the gt grid (H x W)."""
    extra = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [0.5, 0.0],
         [0.5 / w, 0.5 / h], [(w - 0.5) / w, (h - 0.5) / h], [3.5 / W, 2.5 / H], [(W - 0.5) / W, 0.5 / H]],
        dtype=torch.float64,
    )
    pts = torch.rand(p, 2, generator=g, dtype=torch.float64)
    k = min(p, len(extra))
    pts[p - k :] = extra[:k]
    return pts.to(dtype)


# (Q, N, T, h, w, H, W, P): odd and prime sizes so no dimension hides a transposition; N = 0 and 1
# for zero and one target; gt at ~4x the prediction size as in training.
COST_SHAPES = [
    (7, 5, 1, 9, 11, 37, 43, 101),
    (13, 3, 2, 6, 5, 23, 19, 67),
    (4, 1, 3, 8, 8, 32, 32, 13),
    (5, 0, 1, 7, 9, 28, 36, 31),
    # gt maps over 1 MB (training masks at full input size): beyond the caches
    (3, 2, 1, 9, 11, 1031, 1049, 97),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("gt_dtype", [torch.bool, torch.uint8])
@pytest.mark.parametrize("shape", COST_SHAPES)
def test_cost_matches_composition(shape, gt_dtype, dtype, backend):
    _backend_or_skip(backend, dtype)
    Q, N, T, h, w, H, W, P = shape
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    pred = torch.randn(Q, T, h, w, generator=g, dtype=torch.float64) * 4
    gt = make_masks(N, T, H, W, g, gt_dtype)
    pts = make_points(P, g, torch.float64, h, w, H, W)
    exp_bce, exp_dice = ref_cost(pred, gt, pts)
    bce, dice = pm.point_mask_cost(pred.to(dtype), gt, pts.to(dtype), backend=backend)
    assert bce.dtype == dice.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(bce, exp_bce, name="bce", **TOL[dtype])
    assert_close(dice, exp_dice, name="dice", **TOL[dtype])
    if T == 1:  # the same problem without the view dimension
        bce2, dice2 = pm.point_mask_cost(pred[:, 0].to(dtype), gt[:, 0], pts.to(dtype), backend=backend)
        assert_close(bce2, exp_bce, name="bce 3d", **TOL[dtype])
        assert_close(dice2, exp_dice, name="dice 3d", **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cost_valid_and_strided_views(backend):
    """gt_valid zeroes (target, view) pairs; a strided view of bigger masks is read in place."""
    _backend_or_skip(backend)
    dt = torch.float32 if backend == "triton" else torch.float64
    g = torch.Generator().manual_seed(3)
    Q, N, T, h, w, H, W, P = 6, 4, 3, 5, 7, 20, 28, 41
    pred = torch.randn(Q, T, h, w, generator=g, dtype=torch.float64)
    big = make_masks(N, T + 2, H + 3, W + 5, g, special=False)
    gt = big[:, 1 : 1 + T, 2 : 2 + H, 1 : 1 + W]  # non-contiguous in every dim
    valid = torch.rand(N, T, generator=g) > 0.4
    pts = make_points(P, g, torch.float64, h, w, H, W)
    exp = ref_cost(pred, gt, pts, valid)
    got = pm.point_mask_cost(pred.to(dt), gt, pts.to(dt), gt_valid=valid, backend=backend)
    for a, e, name in zip(got, exp, ("bce", "dice")):
        assert_close(a, e, name=name, **TOL[dt])


@pytest.mark.parametrize("backend", BACKENDS)
def test_points_outside_follow_zero_padding(backend):
    """Points outside [0, 1] sample zero padding, as grid_sample does (pinned on exact values)."""
    _backend_or_skip(backend)
    dt = torch.float32 if backend == "triton" else torch.float64
    pred = torch.full((1, 4, 4), 3.0, dtype=torch.float64)
    gt = torch.ones(1, 8, 8, dtype=torch.bool)
    # far outside (pure padding); x = -1/8: past the edge by half a pred pixel and 1.5 gt pixels (0);
    # x = 0 on the border: half the weight on padding for both grids
    pts = torch.tensor([[-0.5, 0.5], [1.7, 0.5], [0.5, 3.0], [-1 / 8, 0.5], [0.0, 0.5]], dtype=torch.float64)
    bce, dice = pm.point_mask_cost(pred.to(dt), gt, pts.to(dt), backend=backend)
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.5], dtype=torch.float64)  # pred samples
    t = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5], dtype=torch.float64)  # gt samples
    exp_bce = (F.softplus(x) - x * t).mean()
    s = x.sigmoid()
    exp_dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
    assert_close(bce[0, 0], exp_bce, name="bce")
    assert_close(dice[0, 0], exp_dice, name="dice")
    exp = ref_cost(pred[:, None], gt[:, None], pts)
    assert_close(bce, exp[0], name="bce vs grid_sample")


# (M, K, K', h, w, H, W, P)
LOSS_SHAPES = [
    (6, 11, 9, 9, 11, 37, 43, 53),
    (1, 1, 1, 6, 5, 23, 19, 29),
    (0, 3, 2, 5, 5, 20, 20, 17),
    # prediction (fp32 and fp64) and gt maps over 1 MB: beyond the caches
    (3, 4, 3, 523, 531, 1031, 1049, 211),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("shape", LOSS_SHAPES)
def test_loss_values_and_gradients(shape, indexed, dtype, backend):
    _backend_or_skip(backend, dtype)
    M, K, K2, h, w, H, W, P = shape
    g = torch.Generator().manual_seed(M * 100 + P)
    base = torch.randn(K, h, w, generator=g, dtype=torch.float64) * 4
    gt_all = make_masks(K2, 1, H, W, g)[:, 0]
    pts = torch.zeros(0, P, 2, dtype=torch.float64)
    if M:
        pts = torch.stack([make_points(P, g, torch.float64, h, w, H, W) for _ in range(M)])
    if M:
        pts[0, :3] = torch.tensor([[-0.2, 0.5], [0.5, 1.3], [1.0 + 1e-3, 0.0]], dtype=torch.float64)  # outside
    valid = torch.rand(M, generator=g) > 0.3
    if indexed:
        # repeated prediction rows: their gradients must accumulate
        pidx = torch.randint(0, K, (M,), generator=g)
        if M >= 2:
            pidx[1] = pidx[0]
        gidx = torch.randint(0, K2, (M,), generator=g)
        kwargs = dict(pred_index=pidx, gt_index=gidx, gt_valid=valid)
    else:
        pidx = torch.arange(M) % K
        gidx = torch.arange(M) % K2
        kwargs = dict(gt_valid=valid)
    weights_b = torch.rand(M, generator=g, dtype=torch.float64)
    weights_d = torch.rand(M, generator=g, dtype=torch.float64)

    ref_in = base.clone().requires_grad_(True)
    eb, ed = ref_loss(ref_in[pidx], gt_all[gidx], pts, valid)
    ((eb * weights_b).sum() + (ed * weights_d).sum()).backward()

    pred_rows = base if indexed else base[pidx]
    inp = pred_rows.to(dtype).clone().requires_grad_(True)
    gt_rows = gt_all if indexed else gt_all[gidx]
    bce, dice = pm.point_mask_loss(inp, gt_rows, pts.to(dtype), backend=backend, **kwargs)
    assert bce.shape == dice.shape == (M,)
    ((bce * weights_b.to(bce)).sum() + (dice * weights_d.to(dice)).sum()).backward()
    assert_close(bce, eb, name="bce", **TOL[dtype])
    assert_close(dice, ed, name="dice", **TOL[dtype])
    # without an index pair m owns row m, which is the reference's row pidx[m] (no repeats: M <= K)
    exp_grad = ref_in.grad if indexed else ref_in.grad[pidx]
    assert_close(inp.grad, exp_grad, name="grad", **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_empty_and_full_masks(backend):
    """Empty and full gt, confident predictions: the closed-form values."""
    _backend_or_skip(backend)
    dt = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-5, atol=1e-7) if dt == torch.float32 else dict(rtol=1e-10, atol=1e-12)  # fp32: 1 - x cancels
    pred = torch.stack([torch.full((5, 5), 9.0), torch.full((5, 5), -9.0)]).to(dt)
    gt = torch.stack([torch.ones(20, 20), torch.zeros(20, 20)]).bool()
    # points strictly inside so that no padding is involved
    pts = (torch.rand(2, 31, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.8 + 0.1).to(dt)
    bce, dice = pm.point_mask_loss(pred, gt, pts, backend=backend)
    sp = F.softplus(torch.tensor(-9.0, dtype=torch.float64))
    assert_close(bce, torch.stack([sp, sp]), name="bce", **tol)
    s = torch.sigmoid(torch.tensor(9.0, dtype=torch.float64))
    full = 1 - (2 * 31 * s + 1) / (31 * s + 31 + 1)
    empty = 1 - 1 / (31 * (1 - s) + 1)
    assert_close(dice, torch.stack([full, empty]), name="dice", **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncertain_points_match_detectron2(backend):
    _backend_or_skip(backend)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 13, 17, generator=g) * 3
    for num_points, over, imp in ((97, 3.0, 0.75), (20, 2.0, 1.0), (33, 1.0, 0.0)):
        exp = ref_uncertain_points(logits, num_points, over, imp, torch.Generator().manual_seed(11))
        gen = torch.Generator().manual_seed(11)
        got = pm.sample_uncertain_points(logits, num_points, over, imp, gen, backend=backend)
        assert got.shape == (7, num_points, 2)
        if backend == "triton":
            # other fp32 rounding (no fma order) may swap candidates whose |logit| tie to ~1e-7
            assert (got != exp).any(-1).float().mean() < 0.02
        else:
            assert torch.equal(got, exp)
    # logit maps over 1 MB: the same points
    big = torch.randn(2, 521, 533, generator=g) * 3
    exp = ref_uncertain_points(big, 61, 3.0, 0.75, torch.Generator().manual_seed(3))
    got = pm.sample_uncertain_points(big, 61, 3.0, 0.75, torch.Generator().manual_seed(3), backend=backend)
    assert (got != exp).any(-1).float().mean() < 0.02 if backend == "triton" else torch.equal(got, exp)
    # rows picked by an index sample the same as the gathered rows
    idx = torch.tensor([4, 4, 0])
    a = pm.sample_uncertain_points(logits, 50, 3.0, 0.75, torch.Generator().manual_seed(2), index=idx, backend=backend)
    b = pm.sample_uncertain_points(logits[idx], 50, 3.0, 0.75, torch.Generator().manual_seed(2), backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # the same row twice still gets its own draws


@pytest.mark.gpu
def test_triton_compiled_on_gpu_matches_reference():
    """The compiled kernels (TRITON_INTERPRET=0) against the reference on CUDA, values and gradients."""
    dev = cuda_or_skip()
    if pm.triton_usable(dev) is False or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("run with TRITON_INTERPRET=0 for the compiled kernels")
    g = torch.Generator(device=dev).manual_seed(0)
    Q, N, T, h, w, H, W, P = 37, 11, 2, 63, 65, 251, 259, 1001
    pred = torch.randn(Q, T, h, w, generator=g, device=dev) * 3
    gt = torch.rand(N, T, H, W, generator=g, device=dev) > 0.5
    pts = torch.rand(P, 2, generator=g, device=dev) * 1.1 - 0.05
    costs = [pm.point_mask_cost(pred, gt, pts, backend=b) for b in ("triton", "torch")]
    for a, e in zip(*costs):
        assert_close(a, e, rtol=1e-4, atol=1e-5)
    K, M = Q * T, 29
    logits = pred.reshape(K, h, w).clone().requires_grad_(True)
    pidx = torch.randint(0, K, (M,), generator=g, device=dev)
    gidx = torch.randint(0, N * T, (M,), generator=g, device=dev)
    lpts = torch.rand(M, P, 2, generator=g, device=dev)
    grads = []
    for backend in ("triton", "torch"):
        b, d = pm.point_mask_loss(logits, gt.flatten(0, 1), lpts, pred_index=pidx, gt_index=gidx, backend=backend)
        grads.append((b, d) + torch.autograd.grad(b.sum() + 2 * d.sum(), logits))
    for a, e in zip(*grads):
        assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_uncertain_points_keep_most_uncertain():
    """With importance ratio 1 the kept points are exactly the num_points candidates of smallest |logit|."""
    logits = torch.linspace(-5, 5, 40).view(1, 1, 40).expand(1, 3, 40).contiguous()
    pts = pm.sample_uncertain_points(logits, 16, 4.0, 1.0, torch.Generator().manual_seed(0))
    kept = pm._sample_logits_rows(logits, None, pts, torch.float32).abs()
    cand = torch.rand(1, 64, 2, generator=torch.Generator().manual_seed(0))  # the same first draw
    unc = pm._sample_logits_rows(logits, None, cand, torch.float32).abs()
    assert torch.equal(kept.sort(dim=1).values, unc.sort(dim=1).values[:, :16])


def test_bad_inputs_raise_clear_errors():
    pred = torch.randn(3, 2, 5, 5)
    gt = torch.zeros(4, 2, 20, 20, dtype=torch.bool)
    pts = torch.rand(10, 2)
    with pytest.raises(ValueError, match="views"):
        pm.point_mask_cost(pred, gt[:, :1], pts)
    with pytest.raises(ValueError, match="same number of dims"):
        pm.point_mask_cost(pred, gt[:, 0], pts)
    with pytest.raises(ValueError, match="P x 2"):
        pm.point_mask_cost(pred, gt, torch.rand(10, 3))
    with pytest.raises(ValueError, match="gt_valid"):
        pm.point_mask_cost(pred, gt, pts, gt_valid=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating point"):
        pm.point_mask_cost(pred.long(), gt, pts)
    with pytest.raises(ValueError, match="point sets"):
        pm.point_mask_loss(torch.randn(3, 5, 5), gt[:3, 0], torch.rand(4, 10, 2))
    with pytest.raises(ValueError, match="pred_index"):
        pm.point_mask_loss(
            torch.randn(3, 5, 5), gt[:3, 0], torch.rand(3, 10, 2), pred_index=torch.zeros(2, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="M x P x 2"):
        pm.point_mask_loss(torch.randn(3, 5, 5), gt[:3, 0], torch.rand(3, 10))
    with pytest.raises(ValueError, match="unknown backend"):
        pm.point_mask_cost(pred, gt, pts, backend="fast")


def test_compiled_index_out_of_range_is_caught():
    if not has_compiled_op("point_mask_loss_fwd"):
        pytest.skip("C++ point_mask ops not built")
    with pytest.raises(RuntimeError, match="out of range"):
        pm.point_mask_loss(
            torch.randn(3, 5, 5), torch.zeros(3, 20, 20, dtype=torch.bool), torch.rand(2, 10, 2),
            pred_index=torch.tensor([0, 3]), gt_index=torch.tensor([0, 1]), backend="cpu",
        )


def test_no_float_copy_of_masks(monkeypatch):
    """The gt is sampled from its compact form: no float tensor of the masks' size is ever made."""
    gt = torch.zeros(6, 2, 64, 64, dtype=torch.bool)
    pred = torch.randn(4, 2, 16, 16)
    pts = torch.rand(50, 2)
    limit = gt[0, 0].numel()  # any float tensor this big would be a copy of (part of) the masks
    seen = []
    real_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.dtype == torch.bool and out.is_floating_point():
            seen.append(self.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    pm.point_mask_cost(pred, gt, pts, backend="torch")
    pm.point_mask_loss(torch.randn(12, 16, 16), gt.flatten(0, 1), torch.rand(12, 50, 2), backend="torch")
    assert seen and max(seen) < limit


# ------------------------------------------------------------------------------------------------
# 16-bit logits on the Triton path (`auto` takes it for fp16/bf16 CUDA tensors; here the interpreter)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_logits(dtype, device):
    """fp16/bf16 logits: the kernels read them and compute in fp32, so values match the float64
    reference on the same rounded logits to fp32 accuracy; the gradient is returned in the logits'
    dtype, and its error stays within twice that of the torch path's (which also rounds it once).
    CPU: the interpreter; CUDA: the compiled kernels (TRITON_INTERPRET=0)."""
    dev = triton_device_or_skip(device)
    g = torch.Generator().manual_seed(16)
    # (Q, N, h, w, H, W, P, M) odd sizes; M pairs with repeated prediction rows
    Q, N, h, w, H, W, P, M = 9, 5, 13, 11, 49, 45, 61, 7
    pred = (torch.randn(Q, h, w, generator=g) * 4).to(dtype)
    gt = make_masks(N, 1, H, W, g)[:, 0]
    pts = make_points(P, g, torch.float64, h, w, H, W)
    exp_bce, exp_dice = ref_cost(pred.double()[:, None], gt[:, None], pts)
    bce, dice = pm.point_mask_cost(pred.to(dev), gt.to(dev), pts.float().to(dev), backend="triton")
    assert bce.dtype == torch.float32
    assert_close(bce, exp_bce, name="cost bce", rtol=1e-5, atol=1e-5)
    assert_close(dice, exp_dice, name="cost dice", rtol=1e-5, atol=1e-5)

    pidx = torch.tensor([0, 3, 3, 8, 1, 5, 0])
    gidx = torch.randint(0, N, (M,), generator=g)
    lpts = torch.stack([make_points(P, g, torch.float64, h, w, H, W) for _ in range(M)])
    ref_in = pred.double().requires_grad_(True)
    eb, ed = ref_loss(ref_in[pidx], gt[gidx], lpts)
    (eb.sum() + 2 * ed.sum()).backward()
    errors = {}
    for backend in ("triton", "torch"):
        inp = pred.to(dev).clone().requires_grad_(True)
        b, d = pm.point_mask_loss(inp, gt.to(dev), lpts.float().to(dev), pred_index=pidx.to(dev),
                                  gt_index=gidx.to(dev), backend=backend)
        (b.sum() + 2 * d.sum()).backward()
        assert inp.grad.dtype == dtype
        if backend == "triton":
            assert_close(b, eb, name="loss bce", rtol=1e-5, atol=1e-5)
            assert_close(d, ed, name="loss dice", rtol=1e-5, atol=1e-5)
        errors[backend] = float((inp.grad.double().cpu() - ref_in.grad).abs().max())
    scale = float(ref_in.grad.abs().max())
    print(f"{dtype} grad max error: triton {errors['triton']:.3e}, torch {errors['torch']:.3e} (scale {scale:.3e})")
    assert errors["triton"] <= 2 * errors["torch"] + 1e-6 * scale

    logits = (torch.randn(Q, h, w, generator=g) * 3).to(dtype)
    cand = torch.rand(M, 53, 2, generator=g)
    got = pm._sample_candidates(logits.to(dev), pidx.to(dev), cand.to(dev), "triton")
    assert_close(got, pm._sample_logits_rows(logits.double(), pidx, cand.double(), torch.float64), rtol=1e-5,
                 atol=1e-5, name="candidate samples")


# ------------------------------------------------------------------------------------------------
# index range, devices, launch device


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["pred_high", "pred_negative", "gt_high"])
def test_loss_index_out_of_range_is_rejected(backend, bad):
    """An index outside its rows is an error on every backend (the Triton path checked it only for
    dtype and shape, and scattered the gradient out of bounds)."""
    _backend_or_skip(backend)
    pidx, gidx = torch.tensor([0, 2]), torch.tensor([0, 1])
    if bad == "pred_high":
        pidx[1] = 3
    elif bad == "pred_negative":
        pidx[0] = -1
    else:
        gidx[0] = 7
    pred = torch.randn(3, 5, 5, requires_grad=True)
    with pytest.raises((RuntimeError, IndexError), match="out of range|outside|out of bounds"):
        b, d = pm.point_mask_loss(pred, torch.zeros(3, 20, 20, dtype=torch.bool), torch.rand(2, 10, 2),
                                  pred_index=pidx, gt_index=gidx, backend=backend)
        (b.sum() + d.sum()).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_index_out_of_range_is_rejected(backend):
    _backend_or_skip(backend)
    logits = torch.randn(4, 9, 7)
    with pytest.raises((RuntimeError, IndexError), match="out of range|outside|out of bounds"):
        pm.sample_uncertain_points(logits, 10, index=torch.tensor([1, 4]), backend=backend)
    with pytest.raises(ValueError, match="1-D int64"):
        pm.sample_uncertain_points(logits, 10, index=torch.tensor([1, 2], dtype=torch.int32), backend=backend)


def test_tensors_on_another_device_are_rejected():
    """Every tensor must be on the logits' device, for every backend (as the C++ entries require);
    the meta device stands in for a second device on a CPU-only machine."""
    pred = torch.randn(3, 5, 5)
    gt = torch.zeros(3, 20, 20, dtype=torch.bool)
    meta = torch.device("meta")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="is on meta"):
            pm.point_mask_loss(pred, gt, torch.rand(3, 10, 2), pred_index=torch.tensor([0, 1, 2], device=meta),
                               backend=backend)
        with pytest.raises(ValueError, match="is on meta"):
            pm.point_mask_loss(pred, gt.to(meta), torch.rand(3, 10, 2), backend=backend)
        with pytest.raises(ValueError, match="is on meta"):
            pm.point_mask_cost(pred, gt, torch.rand(10, 2, device=meta), backend=backend)


def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """Every Triton launcher enters the device of its tensors (`cuda_device_guard`), not the current
    device (a model on cuda:1 would otherwise launch on GPU 0 with pointers into GPU 1). On CPU the
    guard is a no-op, so the test records which tensors the launchers passed to it."""
    _backend_or_skip("triton")
    seen = spy_device_guard(monkeypatch, "point_mask")
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 7, 9, generator=g, requires_grad=True)
    gt = torch.rand(4, 21, 25, generator=g) > 0.5
    pm.point_mask_cost(pred.detach(), gt, torch.rand(11, 2, generator=g), backend="triton")
    assert len(seen) == 2  # logits and masks sampled
    b, d = pm.point_mask_loss(pred, gt, torch.rand(4, 13, 2, generator=g), backend="triton")
    (b.sum() + d.sum()).backward()
    assert len(seen) == 4  # forward and backward
    pm.sample_uncertain_points(pred.detach(), 8, backend="triton")
    assert seen == [torch.device("cpu")] * 5


# ------------------------------------------------------------------------------------------------
# custom ops: torch.library.opcheck, torch.compile(fullgraph=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_custom_ops_pass_opcheck(backend):
    """Schemas, fake implementations (shapes, dtypes, strides) and the registered autograd of the four
    custom ops agree with their real kernels."""
    _backend_or_skip(backend)
    g = torch.Generator().manual_seed(7)
    dtype = torch.float32
    pred = torch.randn(5, 7, 9, generator=g, dtype=dtype)
    gt = (torch.rand(4, 23, 27, generator=g) > 0.5).view(torch.uint8)
    pts = torch.rand(3, 11, 2, generator=g, dtype=dtype)
    pidx, gidx = torch.tensor([4, 0, 4]), torch.tensor([1, 3, 3])
    valid = torch.tensor([1, 0, 1], dtype=torch.uint8)
    ops = torch.ops.cropformer
    cases = [
        (ops.point_mask_sample_shared.default, (pred[:, None], pts[0], backend)),
        (ops.point_mask_sample_shared.default, (gt[:, None], pts[0], backend)),
        (ops.point_mask_sample_rows.default, (pred, pidx, pts, backend)),
        (ops.point_mask_loss_fwd.default, (pred.clone().requires_grad_(True), gt, pts, pidx, gidx, valid, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_training_step_compiles_in_one_graph(backend):
    """Point sampling, the point losses and their backward (the criterion's mask terms) under
    torch.compile(fullgraph=True): same points, losses and gradient as eager."""
    if backend == "auto" and not has_compiled_op("point_mask_loss_fwd"):
        pytest.skip("C++ point_mask ops not built: auto is the torch path")
    from torch._inductor import config as inductor_config

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(7, 13, 11, generator=g)
    gt = torch.rand(5, 47, 43, generator=g) > 0.5
    pidx, gidx = torch.tensor([6, 0, 2, 2]), torch.tensor([1, 4, 0, 3])

    def step(logits, gt, pidx, gidx):
        points = pm.sample_uncertain_points(logits.detach(), 37, 3.0, 0.75, index=pidx, backend=backend)
        bce, dice = pm.point_mask_loss(logits, gt, points, pred_index=pidx, gt_index=gidx, backend=backend)
        return points, bce.sum() + 2 * dice.sum()

    results = []
    # fallback_random: the compiled graph draws with torch's generator, as eager does
    with inductor_config.patch(fallback_random=True):
        for fn in (step, _compiled(step)):
            torch.manual_seed(3)
            inp = logits.clone().requires_grad_(True)
            points, loss = fn(inp, gt, pidx, gidx)
            loss.backward()  # through the compiled graph's backward (AOTAutograd) for the compiled step
            results.append((points, loss, inp.grad))
    for a, e, name in zip(results[1], results[0], ("points", "loss", "grad")):
        assert_close(a, e, rtol=1e-6, atol=1e-7, name=name)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_matching_cost_compiles_in_one_graph(backend):
    g = torch.Generator().manual_seed(9)
    pred = torch.randn(6, 2, 9, 11, generator=g)
    gt = torch.rand(4, 2, 37, 41, generator=g) > 0.5
    pts = torch.rand(29, 2, generator=g)
    valid = torch.rand(4, 2, generator=g) > 0.3

    def cost(pred, gt, pts, valid):
        bce, dice = pm.point_mask_cost(pred, gt, pts, gt_valid=valid, backend=backend)
        return 5 * bce + 5 * dice

    assert_close(_compiled(cost)(pred, gt, pts, valid), cost(pred, gt, pts, valid), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# self-tests registered for `auto`'s verification


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", ["point_mask_cost", "point_mask_loss", "sample_uncertain_points"])
def test_selftests_pass_and_catch_a_wrong_kernel(op, backend, monkeypatch):
    """Each op's registered self-test passes on its working fast paths (every dtype the backend
    accepts) and raises when the fast path is made wrong."""
    from cropformer.ops import _dispatch

    _backend_or_skip(backend)
    selftest = _dispatch.SELFTESTS[op]
    available = {name: ok for name, ok, _ in _dispatch.PREFERENCES[op]}[backend]
    cpu = torch.device("cpu")
    dtypes = [d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16) if available(cpu, d)]
    assert dtypes
    for dtype in dtypes:
        selftest(backend, cpu, dtype)
    # A wrong fast path: the sampled samples (all three ops read them) off by one part in a thousand.
    for name in ("_sample_shared_op", "_sample_rows_op", "_loss_fwd_op"):
        real = getattr(pm, name)

        def wrong(*args, _real=real):
            out = _real(*args)
            return tuple(o * 1.001 for o in out) if isinstance(out, tuple) else out * 1.001

        monkeypatch.setattr(pm, name, wrong)
    with pytest.raises(AssertionError, match=f"{op} self-test"):
        selftest(backend, cpu, dtypes[0])


@pytest.mark.gpu
def test_triton_on_a_second_gpu_matches_reference():
    """Tensors on cuda:1 while cuda:0 is current: the launches must follow the tensors."""
    cuda_or_skip()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("run with TRITON_INTERPRET=0 for the compiled kernels")
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(9, 31, 29, generator=g, device=dev) * 3).requires_grad_(True)
    gt = torch.rand(5, 123, 117, generator=g, device=dev) > 0.5
    pts = torch.rand(7, 101, 2, generator=g, device=dev)
    pidx = torch.randint(0, 9, (7,), generator=g, device=dev)
    gidx = torch.randint(0, 5, (7,), generator=g, device=dev)
    results = []
    for backend in ("triton", "torch"):
        b, d = pm.point_mask_loss(logits, gt, pts, pred_index=pidx, gt_index=gidx, backend=backend)
        results.append((b, d) + torch.autograd.grad(b.sum() + 2 * d.sum(), logits))
    for a, e in zip(*results):
        assert a.device == dev
        assert_close(a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_point_sample_channels_last_low_precision(dtype):
    """`point_sample` of channels-last maps in bf16/fp16 equals that of the same maps contiguous (torch's
    CPU grid_sample misreads the channels-last layout in 16-bit at larger maps, torch 2.14.1)."""
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(8, 36, 36, 32, generator=g).permute(0, 3, 1, 2).to(dtype)  # channels-last view
    points = torch.rand(8, 185, 2, generator=g).mul(1.2).sub(0.1).to(dtype)
    got = pm.point_sample(maps, points)
    assert torch.isfinite(got).all()
    assert torch.equal(got, pm.point_sample(maps.contiguous(), points))
