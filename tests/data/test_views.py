"""Crop geometry, resize rules and the view builder (cropformer/data/views.py, transforms.py).

The golden tests use the views the original CropFormer mapper built (`shared/reference/golden_tiny/
inputs.pt`, see its README): inference crops of a 160 x 224 image at short side 160, and the
training crop of a 128 x 160 image at short side 128; both must be reproduced exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cropformer.data.synthetic import make_synthetic_image
from cropformer.data.transforms import nearest_indices, resize_bilinear, resized_size
from cropformer.data.views import (
    DenseMasks,
    build_inference_views,
    build_sample,
    corner_crop_boxes,
    draw_train_plan,
    plan_views,
    render_image,
    inference_plan,
    view_grid,
)
from tests.conftest import load_reference


def original_sliding_crops(h: int, w: int, crop_ratio: float = 0.7, stride_ratio: float = 0.6):
    """The original EntityCrop.get_crop_axises loop (stride 0.6 of the side), written out here as an
    independent check of the closed-form corners."""
    cw, ch = int(crop_ratio * w), int(crop_ratio * h)
    sw, sh = int(stride_ratio * w), int(stride_ratio * h)
    out = []
    for starth in range(0, h, sh):
        for startw in range(0, w, sw):
            endh, endw = min(starth + ch, h), min(startw + cw, w)
            out.append((endw - cw, endh - ch, endw, endh))
    return out


# Odd, prime and just-off-power-of-two sizes: int(0.7 * side) truncates differently on each.
ODD_SIZES = [(4, 4), (5, 7), (11, 13), (89, 112), (97, 131), (127, 161), (480, 641), (1023, 1025),
             (3001, 4003), (8999, 12001)]


@pytest.mark.parametrize("h,w", ODD_SIZES)
def test_corner_boxes_spec_formula(h, w):
    cw, ch = int(0.7 * w), int(0.7 * h)
    spec = [(0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h)]
    boxes = corner_crop_boxes(h, w)
    assert boxes == spec
    assert boxes == original_sliding_crops(h, w)
    for x0, y0, x1, y1 in boxes:
        assert (x1 - x0, y1 - y0) == (cw, ch) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    cover = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        cover[y0:y1, x0:x1] = True
    assert cover.all()  # ratio > 0.5: the corners cover the image


@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.75])
def test_corner_boxes_other_ratio(ratio):
    h, w = 101, 157
    cw, ch = int(ratio * w), int(ratio * h)
    assert corner_crop_boxes(h, w, ratio)[3] == (w - cw, h - ch, w, h)


def test_corner_boxes_of_a_side_too_short_to_crop():
    """int(0.7 * 1) = 0: a 1 px side is kept whole, so every image has its four crops."""
    assert corner_crop_boxes(1, 50) == [(0, 0, 35, 1), (15, 0, 50, 1), (0, 0, 35, 1), (15, 0, 50, 1)]
    assert corner_crop_boxes(7, 1) == [(0, 0, 1, 4), (0, 0, 1, 4), (0, 3, 1, 7), (0, 3, 1, 7)]
    for bad in [(0, 5, 0.7), (5, 5, 0.0), (5, 5, 1.5)]:
        with pytest.raises(ValueError):
            corner_crop_boxes(*bad)


# 1 px sides, slivers whose capped long side rounds the short side to 0 px, and EntitySeg's largest.
EXTREME_SIZES = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 50000), (50000, 3), (40, 15000), (15000, 11000)]


@pytest.mark.parametrize("h,w", EXTREME_SIZES)
def test_any_image_size_has_views(h, w):
    plan = inference_plan(h, w)
    assert len(plan.views) == 5
    for v in plan.views:
        x0, y0, x1, y1 = v.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert 1 <= min(v.size) and max(v.size) <= 1333
    assert plan.needed_scale() > 0
    if h * w <= 200_000:  # render them too (the network input of each view)
        image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
        sample = build_sample(image, plan)
        assert [tuple(im.shape[1:]) for im in sample["images"]] == [v.size for v in plan.views]


def test_sliver_view_is_one_pixel_thin():
    """3 x 50000 at short side 800 / max 1333: the long side is capped at 1333 and the short side
    would round to 0 px; it is kept at 1 px (the original fails on such images)."""
    assert inference_plan(3, 50000).views[0].size == (1, 1333)
    assert inference_plan(3, 5000).views[0].size == (1, 1333)  # rounds to 1 by itself (0.8 px)


@pytest.mark.parametrize(
    "h,w,short,max_size,expected",
    [
        (128, 160, 128, 1333, (128, 160)),
        (89, 112, 128, 1333, (128, 161)),  # golden training crop
        (112, 156, 160, 1333, (160, 223)),  # golden inference crops
        (3000, 4000, 800, 1333, (800, 1067)),
        (4000, 3000, 800, 1333, (1067, 800)),
        (1000, 5000, 800, 1333, (267, 1333)),  # long side capped: 800 x 4000 -> x 1333/4000
        (9000, 12000, 640, 1333, (640, 853)),
        (333, 333, 800, 1333, (800, 800)),
    ],
)
def test_resized_size(h, w, short, max_size, expected):
    assert resized_size(h, w, short, max_size) == expected


@pytest.mark.parametrize("in_hw,out_hw", [((89, 112), (128, 161)), ((300, 401), (97, 131)),
                                          ((1201, 1603), (800, 1067)), ((7, 5), (13, 17))])
def test_nearest_indices_equal_pil_nearest(in_hw, out_hw):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, in_hw, dtype=np.uint8)
    expected = np.asarray(Image.fromarray(src).resize(out_hw[::-1], Image.NEAREST))
    rows, cols = nearest_indices(in_hw[0], out_hw[0]), nearest_indices(in_hw[1], out_hw[1])
    np.testing.assert_array_equal(src[np.ix_(rows, cols)], expected)


def test_resize_bilinear_is_pil():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (97, 131, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(img).resize((57, 41), Image.BILINEAR))
    np.testing.assert_array_equal(resize_bilinear(img, (41, 57)), expected)
    np.testing.assert_array_equal(resize_bilinear(img, (97, 131)), img)


def test_golden_inference_views():
    ref = load_reference("golden_tiny", "inputs.pt")
    out = load_reference("golden_tiny", "outputs.pt")
    image = ref["infer.image"].permute(1, 2, 0).numpy()  # HWC RGB, the original image (no resize at 160)
    views = build_inference_views(image, short_side=160, max_size=1333)
    assert views["crop_boxes"][0].tolist() == [0, 0, 224, 160]
    torch.testing.assert_close(views["crop_boxes"][1:].long(), ref["infer.crop_region"])
    torch.testing.assert_close(views["image_sizes"], out["infer.image_sizes"])
    torch.testing.assert_close(views["images"][0], ref["infer.image"], rtol=0, atol=0)
    for t in range(4):  # PIL bilinear of the 112 x 156 crops to 160 x 223: exact
        torch.testing.assert_close(views["images"][t + 1], ref["infer.image_crop"][t], rtol=0, atol=0)


def golden_train_sample():
    ref = load_reference("golden_tiny", "inputs.pt")
    image = ref["train.image"].permute(1, 2, 0).numpy()
    masks = ref["train.instances.gt_masks"].numpy()
    boxes = ref["train.raw_gt_bbox_xywh"].numpy().copy()
    boxes[:, 2:] += boxes[:, :2]
    plan = plan_views(128, 160, short_side=int(ref["train.short_edge"]), max_size=1333,
                      corners=ref["train.crop_indexes"].tolist(), flip=bool(ref["train.flip_applied"]))
    return ref, build_sample(image, plan, DenseMasks(masks), boxes)


def test_golden_train_views():
    ref, s = golden_train_sample()
    assert corner_crop_boxes(128, 160) == [(0, 0, 112, 89), (48, 0, 160, 89), (0, 39, 112, 128),
                                           (48, 39, 160, 128)]
    torch.testing.assert_close(s["crop_boxes"][1:].long(), ref["train.crop_region"])
    torch.testing.assert_close(s["images"][0], ref["train.image"], rtol=0, atol=0)
    torch.testing.assert_close(s["images"][1], ref["train.image_crop"][0], rtol=0, atol=0)
    torch.testing.assert_close(s["masks"][0], ref["train.instances.gt_masks"], rtol=0, atol=0)
    torch.testing.assert_close(s["masks"][1], ref["train.instances_crop.0.gt_masks"], rtol=0, atol=0)
    torch.testing.assert_close(s["valid"][:, 0].int(), ref["train.instances.gt_boxes_valid"])
    torch.testing.assert_close(s["valid"][:, 1].int(), ref["train.instances_crop.0.gt_boxes_valid"])


def reference_view_masks(masks: np.ndarray, plan, view) -> np.ndarray:
    """The original's path: full-resolution masks -> flip -> crop -> PIL NEAREST resize."""
    if plan.flip:
        masks = masks[:, :, ::-1]
    x0, y0, x1, y1 = view.box
    h, w = view.size
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(m[y0:y1, x0:x1]).astype(np.uint8))
                                .resize((w, h), Image.NEAREST)) for m in masks]).astype(bool)


def reference_view_image(image: np.ndarray, plan, view) -> np.ndarray:
    if plan.flip:
        image = image[:, ::-1]
    x0, y0, x1, y1 = view.box
    h, w = view.size
    return np.asarray(Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1])).resize((w, h), Image.BILINEAR))


@pytest.mark.parametrize("h,w,short", [(256, 320, 256), (256, 320, 640), (301, 397, 200), (397, 301, 160)])
@pytest.mark.parametrize("flip", [False, True])
def test_views_match_original_path_on_synthetic(h, w, short, flip):
    """Every view's image and masks equal flip -> crop -> PIL resize of the full-resolution originals:
    the crop view's masks are the crop of the full image's masks, resized (IoU 1 per entity)."""
    rng = np.random.default_rng(h + w + short)
    image, labels = make_synthetic_image(rng, h, w)
    masks = labels[None] == np.arange(labels.max() + 1)[:, None, None]
    plan = plan_views(h, w, short_side=short, max_size=1333, corners=[0, 1, 2, 3], flip=flip)
    s = build_sample(image, plan, DenseMasks(masks))
    assert len(s["masks"]) == 5
    for t, view in enumerate(plan.views):
        np.testing.assert_array_equal(s["images"][t].permute(1, 2, 0).numpy(), reference_view_image(image, plan, view))
        got, ref = s["masks"][t].numpy(), reference_view_masks(masks, plan, view)
        inter, union = (got & ref).sum((1, 2)), (got | ref).sum((1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        assert iou.min() >= 0.99, f"view {t}: min IoU {iou.min():.4f} (entity {iou.argmin()})"
        np.testing.assert_array_equal(got, ref)
        # ids aligned: row i of every view is entity i; non-overlap survives resizing
        assert got.sum(0).max() <= 1
        np.testing.assert_array_equal(s["valid"][:, t].numpy(), ref.reshape(len(ref), -1).any(1))


@pytest.mark.parametrize("flip", [False, True])
def test_inference_views_rendered_in_threads_equal_the_serial_ones(monkeypatch, flip):
    """Large photos render their inference views in a thread pool: the same views, in order."""
    import cropformer.data.views as views

    rng = np.random.default_rng(3)
    image, _ = make_synthetic_image(rng, 403, 611)
    plan = plan_views(403, 611, short_side=200, max_size=1333, corners=[0, 1, 2, 3], flip=flip)
    monkeypatch.setattr(views, "PARALLEL_RENDER_PIXELS", 0)
    calls = []
    pool = views._render_pool()
    real_map = pool.map
    monkeypatch.setattr(pool, "map", lambda fn, items: calls.append(1) or real_map(fn, items))
    threaded = build_sample(image, plan)["images"]
    assert calls, "the pool was not used"
    monkeypatch.setattr(views, "PARALLEL_RENDER_PIXELS", 10**12)
    serial = build_sample(image, plan)["images"]
    assert len(threaded) == len(serial) == 5
    for t, view in enumerate(plan.views):
        assert torch.equal(threaded[t], serial[t])
        np.testing.assert_array_equal(serial[t].permute(1, 2, 0).numpy(), reference_view_image(image, plan, view))


def test_flip_crop_box_is_in_flipped_frame():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (61, 83, 3), dtype=np.uint8)
    flipped = plan_views(61, 83, short_side=61, max_size=1333, corners=[0], flip=True)
    mirrored = plan_views(61, 83, short_side=61, max_size=1333, corners=[0], flip=False)
    a = render_image(image, flipped.views[1], flipped)
    b = render_image(np.ascontiguousarray(image[:, ::-1]), mirrored.views[1], mirrored)
    np.testing.assert_array_equal(a, b)
    rows, cols = view_grid(flipped.views[1], flipped)
    assert cols[0] == 82 and rows[0] == 0  # top-left of the flipped image = top-right of the file


def test_views_box_valid_uses_boxes_and_masks():
    masks = np.zeros((3, 40, 50), bool)
    masks[0, 2:10, 2:10] = True  # top-left only
    masks[1, 30:38, 40:48] = True  # bottom-right only
    boxes = np.array([[2, 2, 10, 10], [40, 30, 48, 38], [0, 0, 50, 40]], float)  # entity 2: box, no mask
    plan = plan_views(40, 50, short_side=40, max_size=1333, corners=[0, 3])
    s = build_sample(np.zeros((40, 50, 3), np.uint8), plan, DenseMasks(masks), boxes)
    assert s["valid"].tolist() == [[True, True, False], [True, False, True], [False, False, False]]
    flip_plan = plan_views(40, 50, short_side=40, max_size=1333, corners=[0, 3], flip=True)
    s = build_sample(np.zeros((40, 50, 3), np.uint8), flip_plan, DenseMasks(masks), boxes)
    assert s["valid"][:2].tolist() == [[True, False, False], [True, False, False]]  # both on the right now


def test_train_plan_draws():
    rng = np.random.default_rng(0)
    plans = [draw_train_plan(300, 400, rng) for _ in range(400)]
    assert {p.short_side for p in plans} == {640, 672, 704, 736, 768, 800}
    corners = np.bincount([p.corners[0] for p in plans], minlength=4)
    assert corners.min() > 60  # uniform over 4 corners (expected 100 each)
    assert 120 < sum(p.flip for p in plans) < 280
    for p in plans[:20]:
        assert len(p.views) == 2
        assert p.views[0].size == resized_size(300, 400, p.short_side, 1333)
        x0, y0, x1, y1 = p.views[1].box
        assert p.views[1].size == resized_size(y1 - y0, x1 - x0, p.short_side, 1333)
    two = draw_train_plan(300, 400, rng, num_crops=2)
    assert len(set(two.corners)) == 2


def test_test_plan():
    p = inference_plan(3000, 4000)
    assert [v.corner for v in p.views] == [-1, 0, 1, 2, 3] and not p.flip
    assert p.views[0].size == (800, 1067)
    assert p.views[1].size == (800, 1067)  # 2800 x 2100 crop resized to short side 800
    assert p.needed_scale() == pytest.approx(1067 / 2800)
