"""The crop-ensemble experiment (issue 17): the detail set's design, the measures of
cropformer/experiments.py, and a tiny end-to-end smoke run of scripts/hires_effect.py."""
from __future__ import annotations

import importlib.util
import json
import math

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from cropformer.data.synthetic import DetailSpec, labels_to_rles, make_detail_image, make_synthetic_dataset, view_cells
from cropformer.data.views import View, plan_views, view_grid
from cropformer.experiments import (
    boundary_iou,
    boundary_region,
    cross_view_agreement,
    entity_quality,
    mean_se,
    paired_gain,
    plot_error_bars,
)
from cropformer.ops.paste import STRIDE
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W, SHORT = 1200, 1600, 256  # the experiment's default geometry


# ------------------------------------------------------------------------------------------------
# The detail set


def _cell_labels(labels: np.ndarray, view: View, plan) -> np.ndarray:
    """The label map sampled at the centres of a view's mask cells (stride 4 of the view's pixels)."""
    h, w = view.size
    rows, cols = view_grid(View(view.box, (-(-h // STRIDE), -(-w // STRIDE)), view.corner), plan)
    return labels[np.ix_(rows, cols)]


def _touch(cells: np.ndarray, i: int, j: int) -> bool:
    """Whether entities i and j occupy 4-neighbouring cells (no cell of anything else between them)."""
    a, b = cells == i, cells == j
    return bool(((a[:, :-1] & b[:, 1:]) | (b[:, :-1] & a[:, 1:])).any() or ((a[:-1] & b[1:]) | (b[:-1] & a[1:])).any())


def test_twin_gaps_resolve_in_the_crops_mask_cells_not_the_full_views():
    """The design's point: a twin pair's gap always separates the halves on a crop's mask-cell grid, and
    often does not on the full view's (it is under one full-view cell)."""
    spec = DetailSpec.for_views(H, W, short_side=SHORT)
    plan = plan_views(H, W, short_side=SHORT, max_size=1333, corners=range(4))
    rng = np.random.default_rng(5)
    full_touch = full_pairs = crop_touch = crop_pairs = 0
    for _ in range(4):
        _, labels, kinds, twins = make_detail_image(rng, H, W, spec)
        assert twins and all(kinds[i] == kinds[j] == "twin" for i, j in twins)
        grids = [_cell_labels(labels, v, plan) for v in plan.views]
        for i, j in twins:
            full_pairs += 1
            full_touch += _touch(grids[0], i, j)
            for g in grids[1:]:
                if (g == i).any() and (g == j).any():
                    crop_pairs += 1
                    crop_touch += _touch(g, i, j)
    assert crop_pairs >= 20 and crop_touch == 0, (crop_touch, crop_pairs)
    assert full_touch >= 0.2 * full_pairs, (full_touch, full_pairs)


def test_detail_sizes_sit_between_the_crop_and_full_view_cells():
    full_cell, crop_cell = view_cells(H, W, short_side=SHORT)
    # The full view is 1200 -> 256 (4.69 px per pixel, 18.75 per cell); a crop 840 -> 256 (13.1 per cell).
    assert full_cell == pytest.approx(4 * 1200 / 256, rel=1e-3)
    assert crop_cell == pytest.approx(4 * 840 / 256, rel=1e-3)
    spec = DetailSpec.for_views(H, W, short_side=SHORT)
    assert crop_cell <= spec.gap_px[0] < spec.gap_px[1] <= full_cell
    rng = np.random.default_rng(3)
    _, labels, kinds, twins = make_detail_image(rng, H, W, spec)
    # Twin halves share one appearance; their gap (measured as the distance between them) is in the band.
    for i, j in twins:
        dist = cv2.distanceTransform((labels != i).astype(np.uint8), cv2.DIST_L2, 5)
        gap = dist[labels == j].min()
        assert spec.gap_px[0] - 2 <= gap <= spec.gap_px[1] + 2, (i, j, gap, spec.gap_px)
    # Small discs: COCO "small" (APs counts them) and at least one full-view cell across.
    areas = np.bincount(labels.ravel())
    small = [areas[k] for k, kind in enumerate(kinds) if kind == "small"]
    assert len(small) >= 4 and max(small) < 32**2
    assert np.median(small) >= math.pi / 4 * full_cell**2
    # Thin structures: no wider than the band except at junctions and line caps (under 1% of the pixels
    # farther than half the band's top from the background).
    for idx, kind in enumerate(kinds):
        if kind == "thin":
            inside = cv2.distanceTransform((labels == idx).astype(np.uint8), cv2.DIST_L2, 5)[labels == idx]
            assert inside.size > 2000 and (inside > spec.gap_px[1] / 2 + 1).mean() < 0.01


def test_detail_dataset_links_twins(tmp_path):
    spec = DetailSpec.for_views(300, 400, short_side=64)
    gt = json.loads(make_synthetic_dataset(tmp_path, 2, (300, 400), seed=4, detail=spec).read_text())
    by_id = {a["id"]: a for a in gt["annotations"]}
    twins = [a for a in gt["annotations"] if a["kind"] == "twin"]
    assert twins and all("twin" in a for a in twins)
    for a in twins:
        other = by_id[a["twin"]]
        assert other["twin"] == a["id"] and other["image_id"] == a["image_id"] and other["kind"] == "twin"
    assert not any("twin" in a for a in gt["annotations"] if a["kind"] != "twin")


def test_detail_set_partitions_and_is_seeded():
    spec = DetailSpec.for_views(300, 400, short_side=64)
    a = make_detail_image(np.random.default_rng(1), 300, 400, spec)
    b = make_detail_image(np.random.default_rng(1), 300, 400, spec)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and a[2:] == b[2:]
    labels, kinds = a[1], a[2]
    assert np.bincount(labels.ravel()).min() > 0 and len(kinds) == labels.max() + 1
    assert set(kinds) <= {"stuff", "object", "twin", "thin", "small"}


# ------------------------------------------------------------------------------------------------
# Measures


def _boundary_by_definition(mask: np.ndarray, d: int) -> np.ndarray:
    """Mask pixels with a non-mask pixel (or the outside of the image) within chessboard distance d."""
    padded = np.pad(mask, d, constant_values=False)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(-d, d + 1):
        for dx in range(-d, d + 1):
            out |= ~padded[d + dy:d + dy + h, d + dx:d + dx + w]
    return mask & out


@pytest.mark.parametrize("d", [1, 2, 5])
def test_boundary_region_matches_its_definition(d):
    rng = np.random.default_rng(d)
    for _ in range(5):
        # Odd sizes, blobs touching the border: the image edge must count as contour.
        mask = cv2.GaussianBlur(rng.random((37, 53)), (0, 0), 2) > 0.5
        np.testing.assert_array_equal(boundary_region(mask, d), _boundary_by_definition(mask, d))


def test_boundary_iou_values():
    a = np.zeros((40, 40), bool)
    a[10:30, 10:30] = True
    assert boundary_iou(a, a, 2) == 1.0
    b = np.zeros_like(a)
    b[10:30, 11:31] = True  # shifted right by one pixel
    ba, bb = _boundary_by_definition(a, 2), _boundary_by_definition(b, 2)
    assert boundary_iou(a, b, 2) == pytest.approx((ba & bb).sum() / (ba | bb).sum())
    # A boundary error hurts boundary IoU more than mask IoU (the point of the measure).
    assert boundary_iou(a, b, 2) < (a & b).sum() / (a | b).sum()
    assert boundary_iou(a, np.zeros_like(a), 2) == 0.0


def _gt(labels: np.ndarray, kinds: list[str] | None = None) -> dict:
    h, w = labels.shape
    anns = []
    for k, rle in enumerate(labels_to_rles(labels)):
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle,
                     "area": float(mask_util.area(rle)), **({"kind": kinds[k]} if kinds else {})})
    return {"images": [{"id": 1, "height": h, "width": w, "file_name": "x.png"}], "annotations": anns,
            "categories": [{"id": 1, "name": "entity"}]}


def test_entity_quality():
    labels = np.zeros((64, 80), np.int32)
    labels[5:45, 5:60] = 1
    labels[50:56, 60:66] = 2  # 36 px: COCO small
    gt = _gt(labels, ["stuff", "object", "small"])
    perfect = [{"image_id": 1, "segmentation": a["segmentation"], "score": 1.0} for a in gt["annotations"]]
    q = entity_quality(gt, perfect, boundary_ratio=0.02)
    assert q["mIoU"] == q["mBIoU"] == 100.0 and q["count"] == 3
    # Drop the small entity's prediction and shift the object's by 2 px: the small one scores 0, the object's
    # boundary IoU falls below its mask IoU.
    moved = np.zeros_like(labels)
    moved[7:47, 5:60] = 1
    rle = mask_util.encode(np.asfortranarray((moved == 1).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    q = entity_quality(gt, perfect[:1] + [{"image_id": 1, "segmentation": rle, "score": 1.0}], boundary_ratio=0.02)
    assert q["by_kind"]["small"] == {"mIoU": 0.0, "mBIoU": 0.0, "count": 1}
    assert q["by_size"]["small"]["count"] == 1
    obj = q["by_kind"]["object"]
    assert 0 < obj["mBIoU"] < obj["mIoU"] < 100
    assert entity_quality(gt, [])["mIoU"] == 0.0
    assert math.isnan(q["twins_merged"]) and q["twin_pairs"] == 0


def test_entity_quality_counts_merged_twins():
    labels = np.zeros((40, 60), np.int32)
    labels[5:35, 5:28] = 1
    labels[5:35, 32:55] = 2  # the other half, across a 4 px gap
    gt = _gt(labels, ["stuff", "twin", "twin"])
    gt["annotations"][1]["twin"], gt["annotations"][2]["twin"] = 3, 2

    def rle(mask):
        r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        r["counts"] = r["counts"].decode()
        return {"image_id": 1, "segmentation": r, "score": 1.0}

    separate = [rle(labels == 0), rle(labels == 1), rle(labels == 2)]
    assert entity_quality(gt, separate)["twins_merged"] == 0.0
    one = np.zeros_like(labels, bool)
    one[5:35, 5:55] = True  # both halves and the gap: the best match of each half
    q = entity_quality(gt, [rle(~one), rle(one)])
    assert q["twins_merged"] == 100.0 and q["twin_pairs"] == 1


def _view_logits(mask: np.ndarray, plan, sharpness: float = 8.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at 1/4 of each view (padded to a common size) of one original-resolution mask, as a
    perfectly consistent model would give them: +sharpness inside, -sharpness outside."""
    hp = max(-(-v.size[0] // STRIDE) for v in plan.views)
    wp = max(-(-v.size[1] // STRIDE) for v in plan.views)
    out = torch.full((len(plan.views), 1, hp, wp), -sharpness)
    for t, v in enumerate(plan.views):
        cells = _cell_labels(mask.astype(np.int32), v, plan)
        out[t, 0, : cells.shape[0], : cells.shape[1]] = torch.from_numpy(np.where(cells > 0, sharpness, -sharpness))
    return out, plan.image_sizes(), plan.crop_boxes()


def test_cross_view_agreement():
    h, w = 240, 320
    yy, xx = np.mgrid[0:h, 0:w]
    mask = (yy - 110) ** 2 + (xx - 150) ** 2 < 70**2
    plan = plan_views(h, w, short_side=96, max_size=1333, corners=range(4))
    logits, sizes, boxes = _view_logits(mask, plan)
    total, count = cross_view_agreement(logits, sizes, boxes, torch.tensor([0.9]))
    assert count == 4 and total / count > 0.85  # same entity in every view: only cell quantisation differs
    flipped = logits.clone()
    flipped[1:] = -flipped[1:]  # the crops segment the complement
    total, count = cross_view_agreement(flipped, sizes, boxes, torch.tensor([0.9]))
    assert count == 4 and total / count < 0.15
    # A query under the class-score threshold is not counted.
    assert cross_view_agreement(logits, sizes, boxes, torch.tensor([0.2]), min_score=0.5) == (0.0, 0)


def test_mean_se_and_paired_gain():
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(mean_se([4.0])[1])
    g = paired_gain([11.0, 12.1, 12.9], [10.0, 11.0, 12.0])  # +1.0 +- 0.06
    assert g["beats_by_2se"] and g["mean"] == pytest.approx(1.0)
    g = paired_gain([11.0, 10.0, 12.5], [10.0, 11.0, 12.0])  # +0.17 +- 0.6
    assert not g["beats_by_2se"]
    assert not paired_gain([11.0], [10.0])["beats_by_2se"]  # one seed: no error bar, no claim


def test_plot_error_bars(tmp_path):
    path = tmp_path / "bars.png"
    plot_error_bars(["AP", "AP75"], {"a": ([10.0, 5.0], [1.0, float("nan")]), "b": ([12.0, float("nan")], [0.5, 0.5])},
                    path, title="t")
    img = cv2.imread(str(path))
    assert img is not None and img.shape == (520, 1000, 3) and (img < 250).any(axis=2).mean() > 0.02


# ------------------------------------------------------------------------------------------------
# The one command, end to end (tiny: a few iterations, a few small images)


def _load_script():
    spec = importlib.util.spec_from_file_location("hires_effect", REPO / "scripts" / "hires_effect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_script_smoke_and_resume(tmp_path, caplog):
    script = _load_script()
    argv = ["--out", str(tmp_path), "--seeds", "2", "--iters", "2", "--batch", "2", "--train-images", "2",
            "--val-images", "2", "--size", "128", "160", "--short-side", "64", "--set", "model.decoder.num_queries=12",
            "loss.num_points=64"]
    assert script.main(argv) == 0
    result = json.loads((tmp_path / "hires_effect.json").read_text())
    table = result["summary"]["table"]
    assert set(table) == {"full_image", "full_batch", "crops", "full_crops", "single"}
    for mode, runs in result["per_seed"].items():
        assert len(runs) == 2, mode
        assert all(0.0 <= r["AP"] <= 100.0 and 0.0 <= r["mBIoU"] <= 100.0 for r in runs)
    # Mean and standard error are those of the per-seed values.
    ap = [r["AP"] for r in result["per_seed"]["full_crops"]]
    assert table["full_crops"]["AP"] == pytest.approx([np.mean(ap), np.std(ap, ddof=1) / math.sqrt(2)], nan_ok=True)
    assert set(result["summary"]["gains"]) == {"full_image", "full_batch", "crops", "single"}
    assert set(result["agreement"]["cropformer"][0]) == {"image_decoder", "batch_decoder"}
    assert set(result["agreement"]["mask2former"][0]) == {"image_decoder"}
    assert len({r["dir"] for r in result["runs"]}) == 4  # two models x two seeds
    md = (tmp_path / "hires_effect.md").read_text()
    assert "| Batch-OC (`full_crops`) |" in md and "| Mask2Former |" in md and "twins merged %" in md
    assert cv2.imread(str(tmp_path / "hires_effect.png")) is not None
    # Rerun: nothing is retrained or re-evaluated, and the numbers are the same.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed*/*") if p.is_file()}
    with caplog.at_level("INFO", logger="hires_effect"):
        assert script.main(argv) == 0
    assert caplog.text.count("finished earlier, not retrained") == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((tmp_path / "hires_effect.json").read_text())["per_seed"] == result["per_seed"]
