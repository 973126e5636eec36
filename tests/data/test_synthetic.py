"""Synthetic entity dataset (cropformer/data/synthetic.py): loads with pycocotools, masks never overlap
and cover every pixel, thin structures exist, generation is seeded; its speed is a benchmark
(`pytest -m bench`), not a timed unit test."""
from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from cropformer.data.dataset import EntityDataset
from cropformer.cli.synthetic import main
from cropformer.data.synthetic import labels_to_rles, make_synthetic_dataset, make_synthetic_image

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def load_masks(coco: COCO, image_id: int) -> np.ndarray:
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    return np.stack([coco.annToMask(a) for a in anns]).astype(bool)


def test_dataset_loads_with_pycocotools_and_partitions_images(tmp_path):
    path = make_synthetic_dataset(tmp_path, 50, (256, 320), seed=0)
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 50
    counts = []
    for iid in coco.getImgIds():
        info = coco.loadImgs(iid)[0]
        image = cv2.imread(str(tmp_path / "images" / info["file_name"]))
        assert image.shape == (256, 320, 3)
        masks = load_masks(coco, iid)
        cover = masks.sum(0)
        assert cover.max() == 1, f"image {iid}: masks overlap"
        assert cover.min() == 1, f"image {iid}: pixels without an entity"
        for a, m in zip(coco.loadAnns(coco.getAnnIds(imgIds=iid)), masks):
            assert a["area"] == m.sum() > 0 and a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        counts.append(len(masks))
    assert min(counts) >= 12, counts  # many entities per image, like EntitySeg
    ds = EntityDataset(path, tmp_path / "images", short_sides=(256,), max_size=512)
    s = ds[(0, 0)]
    assert s["valid"][:, 0].all()


def test_hi_res_has_thin_structures(tmp_path):
    rng = np.random.default_rng(1)
    thin_found = 0
    for _ in range(3):
        _, labels = make_synthetic_image(rng, 900, 1200, hi_res=True)
        for i in range(labels.max() + 1):
            m = (labels == i).astype(np.uint8)
            # A long entity that a 5 x 5 opening removes entirely is at most 4 px wide everywhere.
            if m.sum() > 200 and not cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)).any():
                thin_found += 1
    assert thin_found >= 3


def test_labels_to_rles_roundtrip():
    rng = np.random.default_rng(2)
    _, labels = make_synthetic_image(rng, 61, 97)
    rles = labels_to_rles(labels)
    assert len(rles) == labels.max() + 1
    for i, rle in enumerate(rles):
        np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), labels == i)


def test_seeded_and_cli(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", 3, (64, 80), seed=7, image_format="png")
    b = make_synthetic_dataset(tmp_path / "b", 3, (64, 80), seed=7, image_format="png")
    assert json.loads(a.read_text())["annotations"] == json.loads(b.read_text())["annotations"]
    assert (tmp_path / "a/images/000002.png").read_bytes() == (tmp_path / "b/images/000002.png").read_bytes()
    main(["--out", str(tmp_path / "cli"), "--num-images", "2", "--size", "48", "64", "--seed", "7"])
    data = json.loads((tmp_path / "cli/annotations.json").read_text())
    assert [im["height"] for im in data["images"]] == [48, 48]
    assert (tmp_path / "cli/images/000001.jpg").is_file()


@pytest.mark.bench
def test_bench_generation_speed(tmp_path):
    """50 images of 256 x 320 (the demo needs a few hundred): seconds per image, recorded."""
    from tests.bench.common import record

    times = []
    for rep in range(3):
        t0 = time.perf_counter()
        make_synthetic_dataset(tmp_path / str(rep), 50, (256, 320), seed=rep)
        times.append(time.perf_counter() - t0)
    rec = record("synthetic_dataset", {"images": 50, "size": [256, 320], "s_total": sorted(times),
                                       "load_avg_1m": os.getloadavg()[0]})
    print(rec)
