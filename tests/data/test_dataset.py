"""Entity dataset (cropformer/data/dataset.py): RLE handling, JSON validation, samples, batches,
samplers and reproducibility."""
from __future__ import annotations

import copy
import itertools
import json
import logging

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from cropformer.data.dataset import (
    AnnotationError,
    DatasetError,
    EntityDataset,
    GroupedBatchSampler,
    InferenceSampler,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    check_segmentation,
    collate,
    load_entity_records,
    rle_sample,
    rle_string_to_counts,
    segmentation_to_counts,
)
from cropformer.data.decode import ImageDecodeError
from cropformer.data.synthetic import labels_to_rles, make_synthetic_image
from cropformer.data.views import corner_crop_boxes, plan_views, view_grid

# pycocotools' decode trips numpy 2's copy-keyword deprecation; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ----------------------------------------------------------------------------------------------------
# RLE


def random_masks(rng, h, w):
    yield np.zeros((h, w), np.uint8)
    yield np.ones((h, w), np.uint8)
    one = np.zeros((h, w), np.uint8)
    one[0, 0] = 1
    yield one
    last = np.zeros((h, w), np.uint8)
    last[-1, -1] = 1
    yield last
    yield (rng.random((h, w)) < 0.5).astype(np.uint8)  # many runs, large deltas of both signs
    blob = np.zeros((h, w), np.uint8)
    cv2.ellipse(blob, (w // 2, h // 2), (w // 3 + 1, h // 4 + 1), 30, 0, 360, 1, -1)
    yield blob


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (13, 1), (37, 53), (128, 97), (601, 803)])
def test_rle_string_matches_pycocotools(h, w):
    rng = np.random.default_rng(h * w)
    for mask in random_masks(rng, h, w):
        rle = mask_util.encode(np.asfortranarray(mask))
        counts = rle_string_to_counts(rle["counts"])
        assert counts.sum() == h * w
        decoded = np.repeat(np.arange(counts.size) % 2, counts).reshape(w, h).T
        np.testing.assert_array_equal(decoded, mask)
        assert counts.tolist() == rle_string_to_counts(rle["counts"].decode("ascii")).tolist()


@pytest.mark.parametrize("bad", [b"\x7f\x7f", b"0" * 3 + b"_", b" 0"])
def test_rle_string_rejects_garbage(bad):
    with pytest.raises(ValueError):
        rle_string_to_counts(bad)


@pytest.mark.parametrize("h,w", [(37, 53), (128, 97)])
def test_rle_sample_equals_indexing(h, w):
    rng = np.random.default_rng(h + w)
    for mask in random_masks(rng, h, w):
        counts = rle_string_to_counts(mask_util.encode(np.asfortranarray(mask))["counts"])
        for rows, cols in [
            (np.arange(h), np.arange(w)),
            (np.sort(rng.integers(0, h, 29)), np.sort(rng.integers(0, w, 41))[::-1]),  # repeats, flipped
            (rng.integers(0, h, 5), rng.integers(0, w, 3)),
        ]:
            np.testing.assert_array_equal(rle_sample(counts, h, w, rows, cols), mask[np.ix_(rows, cols)].astype(bool))


def coco_decode(segm, h, w) -> np.ndarray:
    """H x W uint8 mask as pycocotools' COCO.annToMask decodes a segmentation."""
    if isinstance(segm, list):
        rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_util.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_util.decode(rle)


def polygon_of(mask):
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def test_segmentation_encodings_agree_with_pycocotools():
    h, w = 61, 87
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (40, 30), (25, 14), 20, 0, 360, 1, -1)
    compressed = {"size": [h, w], "counts": mask_util.encode(np.asfortranarray(mask))["counts"].decode("ascii")}
    # Uncompressed runs written out by hand: background run first, column-major.
    flat = mask.T.ravel()
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size])))
    uncompressed = {"size": [h, w], "counts": ([0] if flat[0] else []) + runs.tolist()}
    polygon = polygon_of(mask)
    for segm in (compressed, uncompressed, polygon):
        assert check_segmentation(segm, h, w) is None
        counts = segmentation_to_counts(segm, h, w)
        expected = coco_decode(segm, h, w)
        got = rle_sample(counts, h, w, np.arange(h), np.arange(w))
        np.testing.assert_array_equal(got, expected.astype(bool))


@pytest.mark.parametrize(
    "segm,why",
    [
        ({"size": [10, 10], "counts": "0"}, "differs from the image"),
        ({"counts": "abc"}, "without a [height, width] size"),
        ({"size": [20, 30], "counts": [5, 5]}, "sum to 10"),
        ({"size": [20, 30], "counts": [-1, 601]}, "non-negative"),
        ({"size": [20, 30], "counts": 7}, "neither a string nor a list"),
        ([[1.0, 2.0, 3.0, 4.0]], "fewer than 3 points"),
        ([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]], "odd number"),
        ([], "empty polygon"),
        ("abc", "segmentation of type str"),
        (None, "segmentation of type NoneType"),
    ],
)
def test_check_segmentation_finds_malformed(segm, why):
    assert why in check_segmentation(segm, 20, 30)


def test_compressed_counts_not_covering_image():
    rle = mask_util.encode(np.asfortranarray(np.ones((5, 5), np.uint8)))
    with pytest.raises(ValueError, match="cover 25 pixels"):
        segmentation_to_counts({"size": [6, 5], "counts": rle["counts"]}, 6, 5)


# ----------------------------------------------------------------------------------------------------
# A small dataset on disk with every mask encoding


H, W = 96, 128


def write_dataset(tmp_path, num_images=4, encodings=("compressed", "uncompressed", "polygon"),
                  empty_image=True, crowd=True, seed=0, fmt="png", size=(H, W)):
    """Synthetic images with entity masks in the given encodings (cycled over annotations), a crowd
    annotation and an image without annotations. Returns (json path, image root, label maps)."""
    h, w = size
    rng = np.random.default_rng(seed)
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    images, anns, labels_by_id = [], [], {}
    for i in range(num_images):
        image, labels = make_synthetic_image(rng, h, w)
        name = f"{i}.{fmt}"
        cv2.imwrite(str(root / name), image[:, :, ::-1])
        iid = 100 + i
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
        labels_by_id[iid] = labels
        for k, rle in enumerate(labels_to_rles(labels)):
            enc = encodings[len(anns) % len(encodings)]
            if enc == "uncompressed":
                segm = {"size": [h, w], "counts": rle_string_to_counts(rle["counts"]).tolist()}
            elif enc == "polygon":
                segm = polygon_of(labels == k) or rle  # a 1-2 px entity has no 3-point contour
            else:
                segm = rle
            anns.append({"id": 1000 * i + k, "image_id": iid, "category_id": 7, "iscrowd": 0,
                         "segmentation": segm, "bbox": [float(v) for v in mask_util.toBbox(rle)]})
        if crowd:
            anns.append({"id": 1000 * i + 999, "image_id": iid, "category_id": 7, "iscrowd": 1,
                         "segmentation": labels_to_rles(labels)[0], "bbox": [0, 0, 5, 5]})
    if empty_image:
        cv2.imwrite(str(root / "empty.png"), np.zeros((h, w, 3), np.uint8))
        images.append({"id": 999, "file_name": "empty.png", "height": h, "width": w})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 7, "name": "x"}]}))
    return path, root, labels_by_id


def expected_view_masks(segms, h, w, plan, view):
    """The original's path: pycocotools decode at full resolution -> flip -> crop -> PIL NEAREST."""
    out = []
    for segm in segms:
        m = coco_decode(segm, h, w)
        if plan.flip:
            m = m[:, ::-1]
        x0, y0, x1, y1 = view.box
        m = np.ascontiguousarray(m[y0:y1, x0:x1])
        out.append(np.asarray(Image.fromarray(m).resize(view.size[::-1], Image.NEAREST)).astype(bool))
    return np.stack(out)


@pytest.mark.parametrize("encoding", ["compressed", "uncompressed", "polygon"])
def test_sample_masks_every_encoding(tmp_path, encoding):
    path, root, _ = write_dataset(tmp_path, num_images=2, encodings=(encoding,))
    ds = EntityDataset(path, root, short_sides=(80, 112, 144), max_size=400)
    data = json.loads(path.read_text())
    for key in [(0, 0), (0, 1), (1, 2), (1, 5)]:
        s = ds[key]
        anns = [a for a in data["annotations"] if a["image_id"] == s["image_id"] and a["iscrowd"] == 0]
        assert s["ann_ids"] == [a["id"] for a in anns]  # crowd left out, file order kept
        plan = _plan_of(s, H, W)
        for t, view in enumerate(plan.views):
            ref = expected_view_masks([a["segmentation"] for a in anns], H, W, plan, view)
            np.testing.assert_array_equal(s["masks"][t].numpy(), ref)
            assert s["valid"][:, t].tolist() == ref.reshape(len(ref), -1).any(1).tolist()
        assert s["labels"].tolist() == [0] * len(anns)


def _plan_of(sample, h, w):
    return plan_views(h, w, short_side=sample["short_side"], max_size=400, corners=sample["corners"],
                      flip=sample["flip"])


def test_empty_images_dropped_for_training_kept_by_option(tmp_path):
    path, root, _ = write_dataset(tmp_path, num_images=2)
    assert len(EntityDataset(path, root)) == 2
    assert len(EntityDataset(path, root, filter_empty=False)) == 3
    test = EntityDataset(path, root, train=False, short_sides=(96,))
    assert len(test) == 3  # evaluation keeps every image
    s = test[2]
    assert s["image_id"] == 999 and "masks" not in s and len(s["images"]) == 5
    two = EntityDataset(path, root, train=False, short_sides=(96,), num_test_crops=2)[2]
    assert two["corners"] == [0, 3] and len(two["images"]) == 3  # input.crop_sample_num_test
    with pytest.raises(ValueError, match="crop_sample_num_test"):
        EntityDataset(path, root, train=False, num_test_crops=5)
    with_masks = EntityDataset(path, root, filter_empty=False, short_sides=(96,))
    empty = with_masks[(2, 0)]
    assert empty["valid"].shape == (0, 2) and empty["masks"][0].shape[0] == 0
    batch = collate([empty, with_masks[(0, 0)]])
    assert batch["targets"][0]["masks"].shape[0] == 0


def test_only_crowd_image_is_empty(tmp_path):
    path, root, _ = write_dataset(tmp_path, num_images=2)
    data = json.loads(path.read_text())
    for a in data["annotations"]:
        if a["image_id"] == 100:
            a["iscrowd"] = 1
    path.write_text(json.dumps(data))
    records = load_entity_records(path, root)
    assert [r["image_id"] for r in records] == [101]


def test_bad_json_reported_with_ids(tmp_path, caplog):
    path, root, _ = write_dataset(tmp_path, num_images=4, empty_image=False, crowd=False)
    data = json.loads(path.read_text())
    anns = data["annotations"]
    first = {iid: next(a for a in anns if a["image_id"] == iid) for iid in (100, 101, 102, 103)}
    first[100]["segmentation"] = {"size": [H + 1, W], "counts": first[100]["segmentation"]["counts"]}
    first[101]["bbox"] = [1, 2, 3]
    data["annotations"].append({"id": 77777, "image_id": 4242, "iscrowd": 0,
                                "segmentation": first[102]["segmentation"], "bbox": [0, 0, 1, 1]})
    data["images"].append({"id": 5555, "file_name": "missing.png", "height": H, "width": W})
    data["images"].append({"id": 6666, "file_name": "0.png", "height": 0, "width": W})
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as e:
        EntityDataset(path, root)
    msg = str(e.value)
    assert f"{first[100]['id']}/100" in msg and "differs from the image" in msg
    assert f"{first[101]['id']}/101" in msg and "bboxes" in msg
    assert "77777" in msg and "5555" in msg and "missing.png" in msg and "6666" in msg
    with caplog.at_level(logging.WARNING, logger="cropformer.data.dataset"):
        ds = EntityDataset(path, root, on_bad_image="skip")
    assert sorted(ds.record(i)["image_id"] for i in range(len(ds))) == [102, 103]
    assert "77777" in caplog.text and "5555" in caplog.text
    # Without the file check the missing file is only found when its sample is loaded.
    assert len(EntityDataset(path, root, on_bad_image="skip", check_files=False, filter_empty=False)) == 3


def test_bad_rle_found_at_sample_time(tmp_path, caplog):
    path, root, _ = write_dataset(tmp_path, num_images=2, encodings=("compressed",), empty_image=False)
    data = json.loads(path.read_text())
    bad = next(a for a in data["annotations"] if a["image_id"] == 100)
    bad["segmentation"]["counts"] = bad["segmentation"]["counts"][:-3]  # runs stop short of H * W
    path.write_text(json.dumps(data))
    fatal = EntityDataset(path, root)
    with pytest.raises(AnnotationError, match=f"annotation {bad['id']} of image 100"):
        fatal[(0, 0)]
    skip = EntityDataset(path, root, on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="cropformer.data.dataset"):
        s = skip[(0, 0)]
    assert s["image_id"] == 101 and f"annotation {bad['id']}" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_bad_image_fatal_or_skipped(tmp_path, caplog, damage):
    path, root, _ = write_dataset(tmp_path, num_images=3, fmt="jpg", empty_image=False)
    ds_fatal = EntityDataset(path, root)
    ds_skip = EntityDataset(path, root, on_bad_image="skip")
    victim = root / "1.jpg"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        victim.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:
        victim.unlink()
    with pytest.raises(ImageDecodeError) as e:
        ds_fatal[(1, 0)]
    assert str(victim) in str(e.value)
    with caplog.at_level(logging.WARNING, logger="cropformer.data.dataset"):
        s = ds_skip[(1, 0)]
    assert s["image_id"] == 102 and str(victim) in caplog.text
    assert ds_skip[(0, 0)]["image_id"] == 100


def test_collate_matches_contract(tmp_path):
    path, root, _ = write_dataset(tmp_path, num_images=3)
    ds = EntityDataset(path, root, short_sides=(80, 112, 144), max_size=400)
    samples = [ds[(i, i)] for i in range(3)]
    b = collate(samples)
    B, T = 3, 2
    assert set(b) == {"images", "image_sizes", "crop_boxes", "orig_sizes", "targets", "image_ids", "file_names"}
    hp, wp = b["images"].shape[-2:]
    assert b["images"].shape == (B, T, 3, hp, wp) and b["images"].dtype == torch.uint8
    assert hp % 32 == 0 and wp % 32 == 0
    assert hp - 32 < int(b["image_sizes"][..., 0].max()) <= hp
    assert b["image_sizes"].shape == (B, T, 2) and b["image_sizes"].dtype == torch.int64
    assert b["crop_boxes"].shape == (B, T, 4) and b["crop_boxes"].dtype == torch.float32
    assert b["orig_sizes"].tolist() == [[H, W]] * B and b["orig_sizes"].dtype == torch.int64
    assert b["image_ids"] == [100, 101, 102] and b["file_names"][0].endswith("0.png")
    for i, s in enumerate(samples):
        assert b["crop_boxes"][i, 0].tolist() == [0, 0, W, H]
        assert tuple(int(v) for v in b["crop_boxes"][i, 1]) == corner_crop_boxes(H, W)[s["corners"][0]]
        tgt = b["targets"][i]
        n = len(s["ann_ids"])
        assert tgt["masks"].shape == (n, T, hp, wp) and tgt["masks"].dtype == torch.bool
        assert tgt["valid"].shape == (n, T) and tgt["valid"].dtype == torch.bool
        assert tgt["labels"].dtype == torch.int64 and tgt["labels"].shape == (n,)
        for t in range(T):
            h, w = b["image_sizes"][i, t].tolist()
            assert torch.equal(b["images"][i, t, :, :h, :w], s["images"][t])
            assert b["images"][i, t, :, h:].eq(0).all() and b["images"][i, t, :, :, w:].eq(0).all()
            assert torch.equal(tgt["masks"][:, t, :h, :w], s["masks"][t])
            assert not tgt["masks"][:, t, h:].any() and not tgt["masks"][:, t, :, w:].any()
            assert torch.equal(tgt["valid"][:, t], tgt["masks"][:, t].flatten(1).any(1))


def test_entities_aligned_across_views(tmp_path):
    """Row i of every view is the same entity: the crop view's masks are the full-resolution label map
    of entity i seen through the crop, for every entity."""
    path, root, labels = write_dataset(tmp_path, num_images=1, encodings=("compressed",))
    ds = EntityDataset(path, root, short_sides=(96,), max_size=400, num_train_crops=3)
    for draw in range(4):
        s = ds[(0, draw)]
        lab = labels[s["image_id"]]
        plan = _plan_of(s, H, W)
        for t, view in enumerate(plan.views):
            rows, cols = view_grid(view, plan)
            sub = lab[np.ix_(rows, cols)]
            for i in range(len(s["ann_ids"])):
                np.testing.assert_array_equal(s["masks"][t][i].numpy(), sub == i)


def test_inference_samples(tmp_path):
    path, root, _ = write_dataset(tmp_path, num_images=2)
    ds = EntityDataset(path, root, train=False, short_sides=(64,), max_size=1333)
    s = ds[1]
    assert not s["flip"] and s["corners"] == [0, 1, 2, 3]
    assert s["crop_boxes"][1:].long().tolist() == [list(b) for b in corner_crop_boxes(H, W)]
    assert s["image_sizes"][0].tolist() == [64, 85]
    b = next(iter(build_test_loader(ds, batch_size=2, num_workers=0, rank=0, world_size=1)))
    assert b["images"].shape[:2] == (2, 5) and "targets" not in b


def test_reduced_decode_in_dataset(tmp_path):
    """A large JPEG seen at a small short side is decoded at 1/2; masks are unaffected (they are
    sampled from the RLE) and images stay close to the full-decode parity path."""
    path, root, _ = write_dataset(tmp_path, num_images=1, encodings=("compressed",), fmt="jpg",
                                  size=(600, 800), empty_image=False, crowd=False)
    fast = EntityDataset(path, root, short_sides=(200,), max_size=1333)
    exact = EntityDataset(path, root, short_sides=(200,), max_size=1333, reduced_decode=False)
    a, b = fast[(0, 3)], exact[(0, 3)]
    assert a["decode_reduction"] == 2 and b["decode_reduction"] == 1  # needs 200 / 420 = 0.48 <= 1/2
    for t in range(2):
        assert torch.equal(a["masks"][t], b["masks"][t])
        diff = (a["images"][t].int() - b["images"][t].int()).abs().float()
        assert diff.mean() < 2.0, diff.mean()


# ----------------------------------------------------------------------------------------------------
# Samplers and reproducibility


def test_training_sampler_shards_and_draws():
    size, world = 10, 3
    streams = [list(zip(range(40), iter(TrainingSampler(size, seed=5, rank=r, world_size=world))))
               for r in range(world)]
    draws = sorted(d for s in streams for _, (_, d) in s)
    assert draws == list(range(120))  # every position of the global stream exactly once
    merged = sorted((d, i) for s in streams for _, (i, d) in s)
    for epoch in range(12):  # each block of `size` positions is a permutation
        assert sorted(i for _, i in merged[epoch * size:(epoch + 1) * size]) == list(range(size))
    again = list(zip(range(40), iter(TrainingSampler(size, seed=5, rank=1, world_size=world))))
    assert again == streams[1]
    other = list(zip(range(40), iter(TrainingSampler(size, seed=6, rank=1, world_size=world))))
    assert other != streams[1]
    resumed = list(zip(range(10), iter(TrainingSampler(size, seed=5, rank=1, world_size=world, start=30))))
    assert [x for _, x in resumed] == [x for _, x in streams[1][30:40]]


def test_grouped_batches():
    groups = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], np.int8)
    sampler = TrainingSampler(10, seed=0, rank=0, world_size=1)
    batches = list(itertools.islice(iter(GroupedBatchSampler(sampler, 3, groups)), 20))
    for b in batches:
        assert len(b) == 3 and len({int(groups[i]) for i, _ in b}) == 1
    draws = [d for b in batches for _, d in b]
    assert len(set(draws)) == len(draws)
    resumed = list(itertools.islice(iter(GroupedBatchSampler(sampler, 3, groups, start_batches=7)), 13))
    assert resumed == batches[7:]
    plain = list(itertools.islice(iter(GroupedBatchSampler(sampler, 3)), 2))
    assert [d for b in plain for _, d in b] == list(range(6))


def test_aspect_groups(tmp_path):
    path, root, _ = write_dataset(tmp_path, num_images=1, empty_image=False)
    data = json.loads(path.read_text())
    image, _ = make_synthetic_image(np.random.default_rng(0), W, H)  # portrait
    cv2.imwrite(str(root / "tall.png"), image)
    data["images"].append({"id": 7, "file_name": "tall.png", "height": W, "width": H})
    rle = labels_to_rles(np.zeros((W, H), np.int32))[0]
    data["annotations"].append({"id": 70, "image_id": 7, "iscrowd": 0, "segmentation": rle, "bbox": [0, 0, H, W]})
    path.write_text(json.dumps(data))
    ds = EntityDataset(path, root, short_sides=(64,))
    assert ds.aspect_groups.tolist() == [0, 1]


def test_inference_sampler_shards():
    shards = [list(InferenceSampler(11, rank=r, world_size=4)) for r in range(4)]
    assert sum(shards, []) == list(range(11)) and [len(s) for s in shards] == [3, 3, 3, 2]


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _assert_same(b1, b2):
    for x, y in zip(b1, b2):
        assert x["image_ids"] == y["image_ids"]
        for k in ("images", "image_sizes", "crop_boxes", "orig_sizes"):
            assert torch.equal(x[k], y[k]), k
        for tx, ty in zip(x["targets"], y["targets"]):
            assert all(torch.equal(tx[k], ty[k]) for k in ("masks", "valid", "labels"))


def test_seeded_loader_reproducible(tmp_path):
    path, root, _ = write_dataset(tmp_path, num_images=4, empty_image=False)
    ds = EntityDataset(path, root, short_sides=(64, 80, 96), max_size=400)
    first = _batches(build_train_loader(ds, batch_size=2, num_workers=0, seed=3, rank=0, world_size=1), 4)
    second = _batches(build_train_loader(ds, batch_size=2, num_workers=0, seed=3, rank=0, world_size=1), 4)
    _assert_same(first, second)
    workers = _batches(build_train_loader(copy.deepcopy(ds), batch_size=2, num_workers=2, seed=3,
                                          rank=0, world_size=1), 4)
    _assert_same(first, workers)  # independent of the number of workers
    other = _batches(build_train_loader(ds, batch_size=2, num_workers=0, seed=4, rank=0, world_size=1), 4)
    assert any(x["image_ids"] != y["image_ids"] or not torch.equal(x["crop_boxes"], y["crop_boxes"])
               for x, y in zip(first, other))
    # short side, flip and corner all vary across draws
    samples = [ds[(0, d)] for d in range(12)]
    assert len({s["short_side"] for s in samples}) > 1 and len({s["flip"] for s in samples}) == 2
    assert len({s["corners"][0] for s in samples}) > 1
