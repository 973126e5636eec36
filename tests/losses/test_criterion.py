"""HungarianMatcher + SetCriterion: the original's golden training losses and matches, the matcher
against the original's per-output/per-image composition, and hand-made cases whose values are
computed independently here (grid_sample on float masks, scipy on explicit cost matrices).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from cropformer.losses import criterion as criterion_module
from cropformer.losses.criterion import build_criteria
from cropformer.losses.matcher import HungarianMatcher, PointSampler
from cropformer.ops.point_mask import sample_uncertain_points
from tests.conftest import assert_close, load_reference


def point_sample(maps, points):
    """detectron2 point_sample: maps K x C x H x W, points K x P x 2 -> K x C x P."""
    return F.grid_sample(maps, 2.0 * points[:, :, None] - 1.0, align_corners=False)[..., 0]


class FixedSampler(PointSampler):
    """Hands out given points: matcher points per (output, problem), loss points per output."""

    def __init__(self, matcher_points, loss_points):
        super().__init__()
        self.m, self.l = matcher_points, loss_points

    def matcher_points(self, output, problem, num_points, device):
        return self.m(output, problem)

    def loss_points(self, output, logits, index, num_points, oversample_ratio, importance_sample_ratio):
        return self.l(output, len(index))


# ------------------------------------------------------------------------------------------------
# golden data of the original (tiny CropFormer, CPU)


def golden():
    return load_reference("golden_tiny", "inputs.pt"), load_reference("golden_tiny", "outputs.pt")


def golden_targets(inp):
    """The batch target of the golden sample built from inputs.pt as the data pipeline delivers it."""
    def pad(m):
        return F.pad(m, (0, 192 - m.shape[-1], 0, 128 - m.shape[-2]))

    masks = torch.stack([pad(inp["train.instances.gt_masks"]), pad(inp["train.instances_crop.0.gt_masks"])], 1)
    valid = torch.stack([inp["train.instances.gt_boxes_valid"], inp["train.instances_crop.0.gt_boxes_valid"]], 1).bool()
    return [{"labels": torch.zeros(5, dtype=torch.int64), "masks": masks, "valid": valid}]


def golden_outputs(out, prefix):
    """Decoder output dict from the stacked [layer, ...] arrays: layer 3 final, 0..2 auxiliary."""
    logits, masks = out[prefix + "pred_logits"], out[prefix + "pred_masks"]
    return {
        "pred_logits": logits[3],
        "pred_masks": masks[3],
        "aux_outputs": [{"pred_logits": logits[k], "pred_masks": masks[k]} for k in range(3)],
    }


def golden_sampler(out, level):
    """The recorded draws. 2d: matcher draws rand.(4o + b), loss coords 0o; 3d: rand.(16 + 3o), 0(4+o)."""
    if level == "2d":
        return FixedSampler(
            lambda o, b: out["train.rand.%02d" % (4 * o + b)][0], lambda o, m: out["train.loss_point_coords.%02d" % o]
        )
    return FixedSampler(
        lambda o, b: out["train.rand.%02d" % (16 + 3 * o + b)][0],
        lambda o, m: out["train.loss_point_coords.%02d" % (4 + o)],
    )


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_golden_losses_and_matches(backend):
    inp, out = golden()
    targets = golden_targets(inp)
    criteria = build_criteria(num_points=1024, backend=backend)
    for level, tag in (("image", "2d"), ("batch", "3d")):
        outputs = golden_outputs(out, f"train.decoder_{tag}.")
        raw, indices = criteria[level].compute(outputs, targets, golden_sampler(out, tag))
        assert len(raw) == 12
        for name, value in raw.items():
            expected = out[f"train.criterion_{tag}_raw.{name}"]
            assert_close(value, expected, rtol=1e-5, atol=1e-6, name=f"{tag} raw {name}")
        weighted = criteria[level](outputs, targets, golden_sampler(out, tag))
        expected = {
            k[len("train.loss.") :]: v for k, v in out.items() if k.startswith("train.loss.") and k.endswith(tag)
        }
        assert sorted(weighted) == sorted(expected)
        for name, value in weighted.items():
            assert value.dtype == torch.float32
            assert_close(value, expected[name], rtol=1e-5, atol=1e-6, name=name)
        # call c of the original = output c (final first, then aux 0..2), problem b
        for c, per_output in enumerate(indices):
            for b, (src, tgt) in enumerate(per_output):
                assert src.tolist() == out[f"train.matcher_{tag}.call{c}.b{b}.pred_idx"].tolist(), (tag, c, b)
                assert tgt.tolist() == out[f"train.matcher_{tag}.call{c}.b{b}.tgt_idx"].tolist(), (tag, c, b)


def test_golden_targets_equal_the_originals():
    """Our batch target form carries the original's per-level targets (2d: valid rows; 3d: zeroed)."""
    inp, out = golden()
    t = golden_targets(inp)[0]
    for view in range(2):
        keep = t["valid"][:, view]
        assert torch.equal(t["masks"][keep, view], out[f"train.targets_2d.{view}.masks"])
    assert torch.equal(t["masks"] & t["valid"][:, :, None, None], out["train.targets_3d.0.masks"])


def test_golden_loss_points_from_the_seed():
    """sample_uncertain_points reproduces every recorded loss point set bit for bit when the global
    generator replays the original's draws (seed 20240603, the recorded shapes in order)."""
    _, out = golden()
    torch.manual_seed(20240603)
    nn, coords = 0, 0
    while nn < 28:
        key = "train.rand.%02d" % nn
        caller = out[key + ".caller"]
        if caller.startswith("matcher"):
            assert torch.equal(torch.rand(*out[key + ".shape"].tolist()), out[key]), key
            nn += 1
            continue
        # a (candidates, random) pair of draws: one sample_uncertain_points call
        tag = "2d" if coords < 4 else "3d"
        c = coords % 4
        layer = 3 if c == 0 else c - 1
        if tag == "2d":
            masks = out["train.decoder_2d.pred_masks"][layer]
            rows = [masks[b, q] for b in range(2) for q in out[f"train.matcher_2d.call{c}.b{b}.pred_idx"].tolist()]
            logits = torch.stack(rows)
        else:
            masks = out["train.decoder_3d.pred_masks"][layer][0]
            logits = masks[out[f"train.matcher_3d.call{c}.b0.pred_idx"]].flatten(0, 1)
        pts = sample_uncertain_points(logits, 1024, 3.0, 0.75)
        assert torch.equal(pts, out["train.loss_point_coords.%02d" % coords]), coords
        coords += 1
        nn += 2
    assert coords == 8


# ------------------------------------------------------------------------------------------------
# the matcher against the original's composition


def reference_match(out, targets, points, batch_level, T, weights=(2.0, 5.0, 5.0)):
    """Mask2Former's matcher loop: per output, per problem, float gt, grid_sample, einsum costs."""
    cc, cm, cd = weights
    result = []
    for o, output in enumerate(out):
        per_output = []
        n_problems = output["pred_logits"].shape[0]
        for i in range(n_problems):
            b, view = (i, None) if batch_level else divmod(i, T)
            tgt = targets[b]
            if batch_level:
                keep = torch.arange(tgt["masks"].shape[0])
                gt = (tgt["masks"] & tgt["valid"][:, :, None, None]).float()  # n x T x H x W
                pred = output["pred_masks"][i]  # Q x T x h x w
            else:
                keep = torch.nonzero(tgt["valid"][:, view]).flatten()
                gt = tgt["masks"][keep, view][:, None].float()
                pred = output["pred_masks"][i][:, None]
            prob = output["pred_logits"][i].softmax(-1)
            cost_class = -prob[:, tgt["labels"][keep]]
            pts = points(o, i)[None]
            t = point_sample(gt, pts.repeat(gt.shape[0], 1, 1)).flatten(1)
            x = point_sample(pred, pts.repeat(pred.shape[0], 1, 1)).flatten(1)
            pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
            neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
            cost_mask = (torch.einsum("nc,mc->nm", pos, t) + torch.einsum("nc,mc->nm", neg, 1 - t)) / x.shape[1]
            s = x.sigmoid()
            cost_dice = 1 - (2 * torch.einsum("nc,mc->nm", s, t) + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
            C = cm * cost_mask + cc * cost_class + cd * cost_dice
            i_, j_ = linear_sum_assignment(C.numpy())
            per_output.append((i_.tolist(), j_.tolist()))
        result.append(per_output)
    return result


def random_case(g, B=2, T=3, Q=11, n=(6, 0), h=9, w=13, H=36, W=52, L=3, batch_level=False):
    targets = []
    for b in range(B):
        masks = F.interpolate(torch.rand(n[b], T, H // 4, W // 4, generator=g), size=(H, W)) > 0.6
        valid = torch.rand(n[b], T, generator=g) > 0.3
        targets.append({"labels": torch.zeros(n[b], dtype=torch.int64), "masks": masks, "valid": valid})
    N = B if batch_level else B * T
    shape = (N, Q, T, h, w) if batch_level else (N, Q, h, w)
    outputs = [
        {"pred_logits": torch.randn(N, Q, 2, generator=g), "pred_masks": torch.randn(*shape, generator=g) * 3}
        for _ in range(L)
    ]
    return outputs, targets


@pytest.mark.parametrize("batch_level", [False, True])
def test_matcher_equals_reference_composition(batch_level, monkeypatch):
    g = torch.Generator().manual_seed(7)
    outputs, targets = random_case(g, batch_level=batch_level)
    P = 97
    pts = torch.rand(3, 6, P, 2, generator=g)
    points = lambda o, i: pts[o, i]  # noqa: E731
    crit = build_criteria(num_points=P)["batch" if batch_level else "image"]
    T = 3
    valid_host = [t["valid"] for t in targets]
    _, _, problems, _, _ = crit._problems(outputs[0]["pred_masks"], targets, valid_host)
    match_outputs = [
        {"pred_logits": o["pred_logits"], "pred_masks": o["pred_masks"] if batch_level else o["pred_masks"][:, :, None]}
        for o in outputs
    ]
    # one host transfer for all outputs and problems; the first call may also run the dispatcher's
    # one-time self-test (its own transfers), so count on the second call
    crit.matcher(match_outputs, problems, FixedSampler(points, None))
    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or real_cpu(self, *a, **k))
    got = crit.matcher(match_outputs, problems, FixedSampler(points, None))
    monkeypatch.undo()
    assert len(calls) == 1
    exp = reference_match(outputs, targets, points, batch_level, T)
    assert [[(s.tolist(), t.tolist()) for s, t in per] for per in got] == exp
    assert any(len(s) for per in got for s, _ in per) and any(len(s) == 0 for per in got for s, _ in per)


# ------------------------------------------------------------------------------------------------
# hand-made cases


def half_planes(H, W, T=2):
    """Entity 0: left half (view 0) / top half (view 1); entity 1: right half (view 0), absent in view 1."""
    masks = torch.zeros(2, T, H, W, dtype=torch.bool)
    masks[0, 0, :, : W // 2] = True
    masks[0, 1, : H // 2] = True
    masks[1, 0, :, W // 2 :] = True
    valid = torch.tensor([[True, True], [True, False]])
    return masks, valid


def safe_points(g, n):
    """Points away from the image border and from the half-plane edges (no mixed bilinear samples)."""
    pts = torch.rand(4 * n, 2, generator=g) * 0.9 + 0.05
    ok = ((pts - 0.5).abs() > 0.05).all(1)
    return pts[ok][:n]


def test_perfect_prediction_gives_near_zero_losses():
    g = torch.Generator().manual_seed(0)
    h = w = 16
    masks, valid = half_planes(64, 64)
    targets = [{"labels": torch.zeros(2, dtype=torch.int64), "masks": masks, "valid": valid}]
    # queries: 2 -> entity 0, 0 -> entity 1, 1 -> nothing (no-object)
    low = F.interpolate(masks.float(), size=(h, w)) > 0.5  # exact: the halves fall on pixel edges
    q_masks = torch.full((3, 2, h, w), -20.0)
    q_masks[2] = torch.where(low[0], 20.0, -20.0)
    q_masks[0] = torch.where(low[1] & valid[1][:, None, None], 20.0, -20.0)
    q_logits = torch.tensor([[20.0, -20.0], [-20.0, 20.0], [20.0, -20.0]])
    P = 200
    sampler = FixedSampler(
        lambda o, i: safe_points(g, P), lambda o, m: torch.stack([safe_points(g, P) for _ in range(m)])
    )
    crit = build_criteria(num_points=P)
    # per view, query 0 says no-object in view 1 where entity 1 is absent
    view_logits = torch.stack([q_logits, q_logits.clone()])
    view_logits[1, 0] = torch.tensor([-20.0, 20.0])
    image_out = {"pred_logits": view_logits, "pred_masks": q_masks.transpose(0, 1)}
    batch_out = {"pred_logits": q_logits[None], "pred_masks": q_masks[None]}
    for level, out in (("image", image_out), ("batch", batch_out)):
        raw, indices = crit[level].compute(out, targets, sampler)
        for name, value in raw.items():
            assert 0 <= value.item() < 1e-6, (level, name, value.item())
    assert [(s.tolist(), t.tolist()) for s, t in indices[0]] == [([0, 2], [1, 0])]


def joint_case():
    """One entity (left half in view 0, right half in view 1); query 0 is perfect in view 0 and
    empty in view 1, query 1 is 0 everywhere. Per view, query 0 wins view 0; jointly query 1 wins."""
    h = w = 16
    masks = torch.zeros(1, 2, 64, 64, dtype=torch.bool)
    masks[0, 0, :, :32] = True
    masks[0, 1, :, 32:] = True
    valid = torch.ones(1, 2, dtype=torch.bool)
    pred = torch.zeros(2, 2, h, w)
    pred[0, 0] = -10.0
    pred[0, 0, :, : w // 2] = 10.0
    pred[0, 1] = -10.0
    logits = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    return [{"labels": torch.zeros(1, dtype=torch.int64), "masks": masks, "valid": valid}], pred, logits


def independent_pair_losses(pred_map, gt_map, pts):
    """BCE and dice of one (prediction, target) pair, composition of the original (float gt)."""
    x = point_sample(pred_map[None, None].double(), pts[None].double())[0, 0]
    t = point_sample(gt_map[None, None].double(), pts[None].double())[0, 0]
    bce = F.binary_cross_entropy_with_logits(x, t)
    s = x.sigmoid()
    dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
    return bce, dice


def test_joint_matching_and_weights_pinned_by_independent_values():
    targets, pred, logits = joint_case()
    g = torch.Generator().manual_seed(1)
    P = 300
    mpts = torch.rand(P, 2, generator=g)
    lpts = torch.rand(2, P, 2, generator=g)  # loss points: pair 0 and pair 1 (view 0, view 1)
    sampler = FixedSampler(lambda o, i: mpts, lambda o, m: lpts[:m])
    crit = build_criteria(num_points=P)
    gt = targets[0]["masks"][0].float()

    # batch level: one joint match, query 1; BCE and dice summed over views / 1 entity; x1
    batch_out = {"pred_logits": logits[None], "pred_masks": pred[None]}
    raw, idx = crit["batch"].compute(batch_out, targets, sampler)
    assert [(s.tolist(), t.tolist()) for s, t in idx[0]] == [([1], [0])]
    b0, d0 = independent_pair_losses(pred[1, 0], gt[0], lpts[0])
    b1, d1 = independent_pair_losses(pred[1, 1], gt[1], lpts[1])
    ce = F.cross_entropy(logits, torch.tensor([1, 0]), torch.tensor([1.0, 0.1]))
    weighted = crit["batch"](batch_out, targets, sampler)
    assert_close(weighted["loss_mask_3d"], 5.0 * (b0 + b1), name="loss_mask_3d")
    assert_close(weighted["loss_dice_3d"], 5.0 * (d0 + d1), name="loss_dice_3d")
    assert_close(weighted["loss_ce_3d"], 2.0 * ce, name="loss_ce_3d")

    # image level: per view, view 0 takes query 0 and view 1 query 1; / 2 targets; x 0.5
    image_out = {"pred_logits": logits[None].expand(2, -1, -1), "pred_masks": pred.transpose(0, 1)}
    raw, idx = crit["image"].compute(image_out, targets, sampler)
    assert [(s.tolist(), t.tolist()) for s, t in idx[0]] == [([0], [0]), ([1], [0])]
    b0, d0 = independent_pair_losses(pred[0, 0], gt[0], lpts[0])
    b1, d1 = independent_pair_losses(pred[1, 1], gt[1], lpts[1])
    ce = F.cross_entropy(
        torch.stack([logits, logits]).transpose(1, 2), torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, 0.1])
    )
    weighted = crit["image"](image_out, targets, sampler)
    assert_close(weighted["loss_mask_2d"], 0.5 * 5.0 * (b0 + b1) / 2, name="loss_mask_2d")
    assert_close(weighted["loss_dice_2d"], 0.5 * 5.0 * (d0 + d1) / 2, name="loss_dice_2d")
    assert_close(weighted["loss_ce_2d"], 0.5 * 2.0 * ce, name="loss_ce_2d")


def test_absent_entity_has_zero_target_even_if_its_mask_is_not_empty():
    """Batch level: where valid is False the target is all zero, whatever the mask holds."""
    targets, pred, logits = joint_case()
    targets[0]["valid"][0, 1] = False
    g = torch.Generator().manual_seed(2)
    P = 150
    lpts = torch.rand(2, P, 2, generator=g)
    sampler = FixedSampler(lambda o, i: torch.rand(P, 2, generator=g), lambda o, m: lpts[:m])
    crit = build_criteria(num_points=P)["batch"]
    raw, idx = crit.compute({"pred_logits": logits[None], "pred_masks": pred[None]}, targets, sampler)
    q = idx[0][0][0].item()
    gt = targets[0]["masks"][0].float()
    b0, d0 = independent_pair_losses(pred[q, 0], gt[0], lpts[0])
    b1, d1 = independent_pair_losses(pred[q, 1], torch.zeros_like(gt[1]), lpts[1])
    assert_close(raw["loss_mask"], b0 + b1, name="loss_mask")
    assert_close(raw["loss_dice"], d0 + d1, name="loss_dice")


def test_num_masks_all_reduced_and_clamped(monkeypatch):
    targets, pred, logits = joint_case()
    sampler_args = (lambda o, i: torch.rand(64, 2, generator=torch.Generator().manual_seed(o)),
                    lambda o, m: torch.rand(m, 64, 2, generator=torch.Generator().manual_seed(9)))
    crit = build_criteria(num_points=64)["batch"]
    out = {"pred_logits": logits[None], "pred_masks": pred[None]}
    local, _ = crit.compute(out, targets, FixedSampler(*sampler_args))

    def fake_world(other):
        monkeypatch.setattr(criterion_module.dist, "is_available", lambda: True)
        monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(criterion_module.dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t.add_(other))

    fake_world(5.0)  # the other rank has 5 entities: num_masks = (1 + 5) / 2 = 3
    reduced, _ = crit.compute(out, targets, FixedSampler(*sampler_args))
    assert_close(reduced["loss_mask"], local["loss_mask"] / 3, name="all-reduced")
    monkeypatch.undo()
    fake_world(0.0)  # (1 + 0) / 2 = 0.5, clamped to 1
    clamped, _ = crit.compute(out, targets, FixedSampler(*sampler_args))
    assert_close(clamped["loss_mask"], local["loss_mask"], name="clamped")


@pytest.mark.parametrize("level", ["image", "batch"])
def test_zero_targets_ten_outputs_and_fp32(level):
    """A sample without entities next to one with; an all-empty batch; ten outputs; bf16 autocast."""
    g = torch.Generator().manual_seed(4)
    batch_level = level == "batch"
    outputs, targets = random_case(g, B=2, T=2, Q=7, n=(0, 3), L=10, batch_level=batch_level)
    for o in outputs:
        o["pred_masks"].requires_grad_(True)
    out = dict(outputs[-1], aux_outputs=outputs[:-1])
    crit = build_criteria(num_points=50)[level]
    bf16 = dict(
        out,
        pred_masks=out["pred_masks"].bfloat16(),
        aux_outputs=[dict(a, pred_masks=a["pred_masks"].bfloat16()) for a in out["aux_outputs"]],
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = crit(bf16, targets)
    suffix = "_2d" if level == "image" else "_3d"
    names = {f"loss_{k}{s}{suffix}" for k in ("ce", "mask", "dice") for s in [""] + [f"_{i}" for i in range(9)]}
    assert set(losses) == names
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(o["pred_masks"].grad is not None for o in outputs)

    empty = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": t["masks"][:0], "valid": t["valid"][:0]} for t in targets
    ]
    losses = crit(out, empty)
    assert losses["loss_mask" + suffix].item() == 0 and losses["loss_dice" + suffix].item() == 0
    assert torch.isfinite(losses["loss_ce" + suffix])
    sum(losses.values()).backward()


def test_mask2former_baseline_names_and_weights():
    targets, pred, logits = joint_case()
    t1 = [{"labels": targets[0]["labels"], "masks": targets[0]["masks"][:, :1]}]  # one view, no valid key
    crit = build_criteria(num_points=64, batch_level=False)
    assert list(crit) == ["image"]
    sampler = FixedSampler(lambda o, i: torch.rand(64, 2, generator=torch.Generator().manual_seed(0)),
                           lambda o, m: torch.rand(m, 64, 2, generator=torch.Generator().manual_seed(1)))
    out = {"pred_logits": logits[None], "pred_masks": pred[:, 0][None]}
    raw, _ = crit["image"].compute(out, t1, sampler)
    weighted = crit["image"](out, t1, sampler)
    assert sorted(weighted) == ["loss_ce", "loss_dice", "loss_mask"]
    for name, w in (("loss_ce", 2.0), ("loss_mask", 5.0), ("loss_dice", 5.0)):
        assert_close(weighted[name], raw[name] * w, name=name)


def test_bad_targets_raise():
    targets, pred, logits = joint_case()
    crit = build_criteria(num_points=16)
    with pytest.raises(ValueError, match="image-level"):
        crit["image"]({"pred_logits": logits[None], "pred_masks": pred[:, 0][None]}, targets)
    with pytest.raises(ValueError, match="batch-level"):
        crit["batch"]({"pred_logits": logits[None], "pred_masks": pred[None, :, :1]}, targets)
    with pytest.raises(ValueError, match="all costs"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)
