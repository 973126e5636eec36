"""Benchmark: what validating the evaluation inputs costs on a large ground truth (issue 13).

Run with `python -m pytest tests/bench/test_bench_eval_validation.py -m bench -s`.

A COCO file of 5,000 images and 200,000 RLE annotations (40 per image; masks of synthetic 480 x 640
entity images, `cropformer.data.synthetic`), and 200,000 predictions of the same masks. Timed (median of
3, wall clock and CPU time): `json.loads` of the file (what any evaluation pays first), `validate_ground_truth`,
`validate_predictions`, and for scale pycocotools' `COCO.createIndex` + `loadRes` (index and
prediction areas; COCOeval itself runs for minutes on top). Printed and appended as JSON lines to
$CROPFORMER_BENCH_OUT (default bench_results.jsonl), with the load average: on a shared CPU the
numbers move with it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import time

import numpy as np
import pytest
from tests.bench.common import record

from cropformer.data.synthetic import labels_to_rles, make_synthetic_image
from cropformer.evaluation import validate_ground_truth, validate_predictions

NUM_IMAGES, PER_IMAGE, H, W = 5000, 40, 480, 640


def _timed(fn, repeats: int = 3) -> dict:
    """Median wall and CPU (this process) milliseconds: on a shared CPU the CPU time moves less."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_ms": round(statistics.median(wall) * 1e3), "cpu_ms": round(statistics.median(cpu) * 1e3)}


@pytest.mark.bench
def test_bench_validation_of_a_large_ground_truth():
    rng = np.random.default_rng(0)
    pool = []  # RLEs of real-looking entity masks, reused across images
    while len(pool) < 4 * PER_IMAGE:
        _, labels = make_synthetic_image(rng, H, W)
        pool += labels_to_rles(labels)
    images, anns, preds = [], [], []
    for i in range(NUM_IMAGES):
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": H, "width": W})
        for k in range(PER_IMAGE):
            rle = pool[(i * 7 + k) % len(pool)]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "segmentation": rle,
                         "area": 1.0, "bbox": [0, 0, 1, 1]})
            preds.append({"image_id": i + 1, "category_id": 1, "segmentation": rle, "score": 0.5})
    text = json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "e"}]})
    gt = json.loads(text)
    chars = sum(len(a["segmentation"]["counts"]) for a in anns)
    load_before = os.getloadavg()[0]
    ms = {"json_loads": _timed(lambda: json.loads(text)),
          "validate_ground_truth": _timed(lambda: validate_ground_truth(gt)),
          "validate_predictions": _timed(lambda: validate_predictions(preds, {im["id"]: (H, W) for im in images}))}

    def pycocotools_index_and_load_res():
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
            coco.loadRes(preds)

    ms["pycocotools_index_and_loadRes"] = _timed(pycocotools_index_and_load_res, repeats=1)
    rec = record("eval_validation", {"images": NUM_IMAGES, "annotations": len(anns), "predictions": len(preds),
                                     "rle_chars_per_mask": chars / len(anns), "json_mb": len(text) / 2**20,
                                     "ms": ms, "load_avg_1m": [load_before, os.getloadavg()[0]]})
    print(json.dumps(rec, indent=1))
