"""Benchmark: loading one training sample's views from a large JPEG, reduced decode vs full decode.

Run with `python -m pytest tests/bench/test_bench_decode.py -m bench -s`.

For 4000 x 3000 and 12000 x 9000 JPEGs (synthetic entities upscaled, with sensor-like noise, quality 92)
it times the image part of a training sample at the largest training short side (800, max 1333; the
full view and one corner crop) two ways:
- full:    decode at full resolution (the parity path: same pixels as the original's PIL reader) and
           PIL-bilinear resize of each view, `decode_image(reduced=False)` + `render_image`;
- reduced: JPEG DCT-domain decode at the largest reduction that keeps the crop view's scale
           (`decode_image(scale=plan.needed_scale())`, OpenCV IMREAD_REDUCED_COLOR_r) + the same resize.
and the mask part (all entities, both views): pycocotools decode at full resolution + PIL NEAREST resize
(what the original does) versus `rle_sample` at the views' pixel grids.

Each configuration runs in a fresh subprocess (one warm-up, then the median of several repeats; the slow
full-resolution mask path runs once) so that its peak resident memory (Linux VmHWM, reset through
/proc/self/clear_refs, minus the resident size before the first run) is its own. Work:
the full path touches H x W x 3 bytes of decoded pixels (36 MB at 4000 x 3000, 324 MB at 12000 x 9000);
the reduced path 1/r^2 of that. Results are printed and appended as JSON lines to
$CROPFORMER_BENCH_OUT (default bench_results.jsonl).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.bench.common import record

REPO = Path(__file__).resolve().parents[2]
SIZES = {"4000x3000": (3000, 4000), "12000x9000": (9000, 12000)}
REPEATS = {"4000x3000": 7, "12000x9000": 3}


def _make_inputs(folder: Path, height: int, width: int) -> tuple[Path, Path]:
    """A JPEG of synthetic entities (drawn at <= 3000 x 4000, nearest-upscaled) with noise, and the
    COCO RLE annotations of its entities as JSON."""
    import cv2
    import numpy as np

    from cropformer.data.synthetic import labels_to_rles, make_synthetic_image

    rng = np.random.default_rng(0)
    base_h, base_w = min(height, 3000), min(width, 4000)
    image, labels = make_synthetic_image(rng, base_h, base_w, hi_res=True)
    if (base_h, base_w) != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
        labels = cv2.resize(labels.astype(np.uint16), (width, height), interpolation=cv2.INTER_NEAREST)
    noise = rng.integers(0, 12, (1024, 1024, 3), dtype=np.uint8)
    reps = (height // 1024 + 1, width // 1024 + 1, 1)
    image = cv2.add(image, np.tile(noise, reps)[:height, :width])
    jpg = folder / f"img_{width}x{height}.jpg"
    cv2.imwrite(str(jpg), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    ann = folder / f"ann_{width}x{height}.json"
    ann.write_text(json.dumps(labels_to_rles(labels.astype(np.int32))))
    return jpg, ann


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _child(kind: str, path: str, ann: str, repeats: int) -> None:
    """Runs in a subprocess: time one configuration, print one JSON line."""
    import statistics
    import time

    import numpy as np
    import pycocotools.mask as mask_util
    from PIL import Image

    from cropformer.data.dataset import rle_sample, rle_string_to_counts
    from cropformer.data.decode import decode_image, read_image_info
    from cropformer.data.views import plan_views, render_image, view_grid

    info = read_image_info(path)
    h, w = info.height, info.width
    plan = plan_views(h, w, short_side=800, max_size=1333, corners=[3])
    rles = json.loads(Path(ann).read_text()) if kind.startswith("masks") else None

    def run():
        if kind == "full" or kind == "reduced":
            d = decode_image(path, scale=plan.needed_scale(), reduced=(kind == "reduced"))
            return [render_image(d.image, v, plan, d.reduction) for v in plan.views], d.reduction
        if kind == "masks_full":
            out = [[] for _ in plan.views]
            for rle in rles:
                m = mask_util.decode(rle)
                for t, v in enumerate(plan.views):
                    x0, y0, x1, y1 = v.box
                    crop = np.ascontiguousarray(m[y0:y1, x0:x1])
                    out[t].append(np.asarray(Image.fromarray(crop).resize(v.size[::-1], Image.NEAREST)))
            return out, 1
        grids = [view_grid(v, plan) for v in plan.views]
        out = [[] for _ in plan.views]
        for rle in rles:
            counts = rle_string_to_counts(rle["counts"])
            for t, (rows, cols) in enumerate(grids):
                out[t].append(rle_sample(counts, h, w, rows, cols))
        return out, 1

    rss0 = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    t0 = time.perf_counter()
    views, reduction = run()  # first run: gives the peak (and the timing when repeats == 0)
    times = [time.perf_counter() - t0]
    peak = _status_bytes("VmHWM") - rss0
    if repeats:
        times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    digest = [np.asarray(v, dtype=np.uint8) for v in views]
    np.savez(path + f".{kind}.npz", *digest)
    print(json.dumps({"median_ms": statistics.median(times) * 1e3, "peak_mem": int(peak),
                      "reduction": reduction, "min_ms": min(times) * 1e3}))


def _run(kind: str, path: Path, ann: Path, repeats: int) -> dict:
    code = ("import sys; from tests.bench.test_bench_decode import _child; "
            "_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))")
    out = subprocess.run([sys.executable, "-c", code, kind, str(path), str(ann), str(repeats)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.bench
@pytest.mark.parametrize("name", list(SIZES))
def test_bench_decode(tmp_path, name):
    import numpy as np

    height, width = SIZES[name]
    jpg, ann = _make_inputs(tmp_path, height, width)
    # The full-resolution mask path takes tens of seconds at 12000 x 9000: one timed run, no warm-up.
    res = {k: _run(k, jpg, ann, REPEATS[name] if k != "masks_full" else 0)
           for k in ("full", "reduced", "masks_full", "masks_rle")}
    full = np.load(str(jpg) + ".full.npz")
    red = np.load(str(jpg) + ".reduced.npz")
    diffs = [float(np.abs(full[k].astype(np.int16) - red[k]).mean()) for k in full.files]
    mfull, mrle = np.load(str(jpg) + ".masks_full.npz"), np.load(str(jpg) + ".masks_rle.npz")
    masks_equal = all(np.array_equal(mfull[k].astype(bool), mrle[k]) for k in mfull.files)
    assert masks_equal, "rle_sample must equal decode + PIL NEAREST"
    img_ratio = res["full"]["median_ms"] / res["reduced"]["median_ms"]
    mask_ratio = res["masks_full"]["median_ms"] / res["masks_rle"]["median_ms"]
    print(f"\n{name} JPEG ({jpg.stat().st_size / 1e6:.1f} MB), train views at short side 800 (full + 1 crop):")
    print(f"  images full decode + resize : {res['full']['median_ms']:8.1f} ms  "
          f"peak {res['full']['peak_mem'] / 2**20:7.1f} MiB")
    print(f"  images reduced 1/{res['reduced']['reduction']} + resize: {res['reduced']['median_ms']:8.1f} ms  "
          f"peak {res['reduced']['peak_mem'] / 2**20:7.1f} MiB  -> {img_ratio:.2f}x faster, "
          f"mean |diff| per view {['%.2f' % d for d in diffs]}")
    n = len(json.loads(ann.read_text()))
    print(f"  masks ({n} entities) decode + NEAREST: {res['masks_full']['median_ms']:8.1f} ms  "
          f"peak {res['masks_full']['peak_mem'] / 2**20:7.1f} MiB")
    print(f"  masks rle_sample at view grids: {res['masks_rle']['median_ms']:8.1f} ms  "
          f"peak {res['masks_rle']['peak_mem'] / 2**20:7.1f} MiB  -> {mask_ratio:.2f}x faster (identical masks)")
    for kind, base in (("full", None), ("reduced", "full"), ("masks_full", None), ("masks_rle", "masks_full")):
        r = res[kind]
        record("decode_views" if "masks" not in kind else "mask_views", {"shape": name, "backend": kind,
                 "median_ms": r["median_ms"], "min_ms": r["min_ms"], "ratio": (res[base]["median_ms"] / r["median_ms"]) if base else 1.0,
                 "peak_mem": r["peak_mem"], "reduction": r["reduction"], "file_bytes": jpg.stat().st_size,
                 "decoded_bytes_full": height * width * 3, "image_mean_abs_diff": diffs if kind == "reduced" else None})
    assert res["reduced"]["reduction"] > 1
