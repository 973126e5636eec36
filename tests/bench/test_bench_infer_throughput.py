"""Batch throughput of `infer.py` over a folder (issue 15): images per second of the one-at-a-time loop
(`--workers 0`) against the pipeline (`--workers 2`: threads decode ahead and write behind while the
network runs) and the pipeline with batches of equal padded size (`--batch-size 4`).

    CROPFORMER_BENCH_OUT=/tmp/bench/infer.jsonl python -m pytest -m bench tests/bench/test_bench_infer_throughput.py -s

Take the numbers on an idle machine (`uptime` load under about 1.5): every record carries the load
average at its start and end. CROPFORMER_BENCH_REPS (default 3) sets the repetitions of the tiny model,
variants interleaved (and their order rotated) within each; CROPFORMER_BENCH_QUICK=1 shrinks every size to
check the benchmark itself in a minute.

Inputs: synthetic photos (smooth gradients, blotchy texture and 6-11 filled shapes, JPEG quality 90),
every third one portrait, so that a folder mixes two padded sizes and `--batch-size 4` forms groups of
both within a batch. Models, random weights, exported with `cropformer.checkpoint.export_weights`:
  - the tiny CropFormer (`tiny`: Swin embed 32, 12 queries; full image + 4 crops at short side 160) on 24
    photos of 480 x 640: the network is cheap, so decoding, the full-resolution paste and writing the
    PNG, the overlay and the JSON weigh far more than they would with a real model;
  - Mask2Former Swin-T (`mask2former_swin_tiny_3x`: one view at short side 800) on 6 photos, one
    repetition: about 3.5 s of network per image on a 2-core CPU, where the file work is about 1%.
    (CropFormer Swin-T runs five views per image, several times longer: not run, to keep the whole
    benchmark near 3 minutes on 2 cores.)

Before the timed runs, one untimed run on one photo records the compiled kernels' self-test verdicts in
the cache, as a user's first run would (the timed runs read them). Each run is a fresh process running
`infer.py`'s own entry point (`cropformer.cli.run(infer.main)`, as `python infer.py` does) into a new,
empty --out, so resume skips nothing. A few lines around it take timestamps and nothing else:
`Segmenter.from_checkpoint` is wrapped to note when the model is ready, and the segmenter's
`segment_batch` and the model's forward are timed. What is counted:
  - images/s = images / (end of `main` - model ready): every image's decode, network and write, the
    failure report and the summary line, and the first forward's one-time warm-up (included: it is part
    of a run; over thousands of frames it vanishes, over 24 it is visible); not the interpreter start,
    the imports, reading the checkpoint or building the model;
  - "after 1st" = the images after the first network call / (end of `main` - end of that call): the
    rate once warm, closer to a folder of thousands; slightly in the pipeline's favour, whose threads
    decode up to `batch + 2 x workers` images during the first call;
  - "cmd img/s" = images / wall time of the whole command, start-up included (what a user waits for);
  - "forward" = seconds inside the model's forward, "(1st)" those of the first call alone (one-time
    costs: lazy imports, torch._dynamo among them, and first allocations); "segment" = seconds inside
    `segment_batch` (views, forward, fusion, the full-resolution paste), both on the main thread;
    "cores" = CPU seconds of the process over the images phase / its wall time.
For the serial loop, images phase - segment = decode + write + bookkeeping, run one after the other:
"not segment" is that share, "not forward" the share of everything but the network's forward; no stand-in
model is used. With workers those shares no longer add up (the stages overlap), and "forward" grows
when the worker threads compete with torch's threads for the cores.

Correctness, asserted against the serial loop's first run: `--workers 2` (and the serial loop itself in
later repetitions) writes byte-identical outputs (.json, .ids.png, .overlay.jpg, failures.json) in every
repetition. `--batch-size 4` writes byte-identical id maps, overlays and failure reports, and entity JSONs
with the same entities in the same order (ids, areas, boxes, RLE masks) whose scores may differ in the
last bits of fp32 (at most 1e-5): a forward over a batch of views rounds differently from one over a
single image's views, so its JSONs are not byte-identical (measured: about 1e-7; reported per run).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.bench.common import loadavg, record
from tests.conftest import REPO

pytestmark = pytest.mark.bench

QUICK = os.environ.get("CROPFORMER_BENCH_QUICK", "") not in ("", "0")
REPS = int(os.environ.get("CROPFORMER_BENCH_REPS", "1" if QUICK else "3"))
PHOTO = (240, 320) if QUICK else (480, 640)  # landscape H x W; every third photo is W x H
VARIANTS = {
    "serial (--workers 0)": ["--workers", "0", "--batch-size", "1"],
    "--workers 2": ["--workers", "2", "--batch-size", "1"],
    "--workers 2 --batch-size 4": ["--workers", "2", "--batch-size", "4"],
}
# name: (config, --set overrides, photos, repetitions)
MODELS = {
    "tiny": ("tiny", [], 8 if QUICK else 24, REPS),
    "Swin-T": ("mask2former_swin_tiny_3x", ["input.min_size_test=160"] if QUICK else [], 3 if QUICK else 6, 1),
}

# `python infer.py ARGS` plus timestamps. configure_cpu_runtime() first, as `run` does: it must see
# the OpenMP settings before torch loads (importing cropformer.inference loads torch).
_DRIVER = """
import json, resource, sys, time
from cropformer.cli import configure_cpu_runtime, run
configure_cpu_runtime()
import torch
from cropformer.cli.infer import main
from cropformer.inference import Segmenter

t = {"forward": [], "segment": []}
load = Segmenter.from_checkpoint.__func__

def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def from_checkpoint(cls, *args, **kwargs):
    seg = load(cls, *args, **kwargs)
    segment_batch = seg.segment_batch

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return segment_batch(*a, **k)
        finally:
            t["segment"].append(time.perf_counter() - t0)
            t.setdefault("first_end", time.perf_counter())
            t.setdefault("first_n", len(a[0]))

    seg.segment_batch = timed
    seg.model.register_forward_pre_hook(lambda m, a: t.__setitem__("f0", time.perf_counter()))
    seg.model.register_forward_hook(lambda m, a, o: t["forward"].append(time.perf_counter() - t["f0"]))
    t["ready"], t["cpu0"] = time.perf_counter(), cpu_s()
    return seg

Segmenter.from_checkpoint = classmethod(from_checkpoint)
code = run(main, sys.argv[1:])
end = time.perf_counter()
print(json.dumps({"code": code, "images_s": end - t["ready"], "cpu_s": cpu_s() - t["cpu0"],
                  "after_first_s": end - t["first_end"], "first_n": t["first_n"],
                  "forward": t["forward"], "segment": t["segment"], "threads": torch.get_num_threads()}))
sys.exit(code)
"""


def synthetic_photo(h: int, w: int, seed: int) -> np.ndarray:
    """A BGR 'photo': gradients, blotchy texture, 6-11 filled circles, bars and polygons, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    img = np.stack([(xx * rng.uniform(0.2, 0.6) + yy * 0.1) % 255, (yy * rng.uniform(0.2, 0.6)) % 255,
                    ((xx + yy) * 0.15 + seed * 30) % 255], -1)
    blotches = cv2.resize(rng.integers(0, 60, (h // 16, w // 16, 3)).astype(np.float32), (w, h),
                          interpolation=cv2.INTER_CUBIC)
    img = np.clip(img * 0.6 + blotches, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(6, 12)):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(min(h, w) // 12, min(h, w) // 4))
        kind = rng.integers(3)
        if kind == 0:
            cv2.circle(img, (cx, cy), s, color, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(img, (cx - s, cy - s // 2), (cx + s, cy + s // 2), color, -1)
        else:
            pts = (rng.normal(0, s, (6, 2)) + (cx, cy)).astype(np.int32)
            cv2.fillPoly(img, [cv2.convexHull(pts)], color, cv2.LINE_AA)
    return np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def make_folder(folder: Path, n: int) -> list[tuple[int, int]]:
    folder.mkdir(parents=True)
    sizes = []
    for i in range(n):
        h, w = PHOTO if i % 3 else PHOTO[::-1]
        cv2.imwrite(str(folder / f"frame_{i:05d}.jpg"), synthetic_photo(h, w, i), [cv2.IMWRITE_JPEG_QUALITY, 90])
        sizes.append((h, w))
    return sizes


def make_checkpoint(config: str, path: Path) -> Path:
    from cropformer.checkpoint import export_weights
    from cropformer.config import load_config
    from cropformer.modeling.build import build_model

    torch.manual_seed(0)
    cfg = load_config(config)
    export_weights(build_model(cfg.model).eval(), cfg, path)
    return path


def run_infer(ckpt: Path, inputs: Path, out: Path, overrides: list[str], variant: list[str]) -> dict:
    args = ["--ckpt", str(ckpt), "--input", str(inputs), "--out", str(out), *variant]
    if overrides:
        args += ["--set", *overrides]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _DRIVER, *args], cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, f"infer {' '.join(args)} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "wall_s": wall}


def outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def same_entities(a: bytes, b: bytes, what: str, tol: float = 1e-5) -> float:
    """Two entity JSONs with the same entities in the same order (ids, areas, boxes, RLE masks, the
    input's key), scores within `tol`; returns the largest score difference."""
    a, b = json.loads(a), json.loads(b)
    scores = [[e.pop("score") for e in d["entities"]] for d in (a, b)]
    assert a == b, f"{what}: entities differ"
    diff = max((abs(x - y) for x, y in zip(*scores)), default=0.0)
    assert diff <= tol, f"{what}: scores differ by {diff:.2e}"
    return diff


def test_infer_throughput(tmp_path):
    print(f"\ninfer.py throughput, {os.cpu_count()} CPUs, {REPS} repetition(s) of the tiny model"
          f"{' (quick)' if QUICK else ''}")
    for model, (config, overrides, n, reps) in MODELS.items():
        inputs = tmp_path / f"{model}-photos"
        sizes = make_folder(inputs, n)
        ckpt = make_checkpoint(config, tmp_path / f"{model}.safetensors")
        # Untimed, on one photo: the kernels' self-test verdicts go to the cache (CROPFORMER_CACHE_DIR, a
        # temporary folder under pytest), as after a user's first run; files and checkpoint are in page cache.
        run_infer(ckpt, inputs / "frame_00000.jpg", tmp_path / f"{model}-warm-up", overrides, VARIANTS["serial (--workers 0)"])
        load0 = loadavg()
        runs = {name: [] for name in VARIANTS}
        reference = None
        score_diff = {name: 0.0 for name in VARIANTS}  # largest |score - serial score|
        json_differ = {name: 0 for name in VARIANTS}  # entity JSONs not byte-identical to serial (most in a rep)
        names = list(VARIANTS)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:  # interleaved, order rotated
                out = tmp_path / f"{model}-out-{rep}-{names.index(name)}"
                runs[name].append(run_infer(ckpt, inputs, out, overrides, VARIANTS[name]))
                got = outputs(out)
                if reference is None:
                    reference = (name, got)
                assert len(got) == 3 * n + 1, f"{name}: {len(got)} outputs for {n} images"
                assert got.keys() == reference[1].keys()
                differ = [f for f in got if got[f] != reference[1][f]]
                what = f"{model} {name} (repetition {rep}) against {reference[0]}"
                if "--batch-size 4" not in name:  # the workers change nothing, to the byte
                    assert not differ, f"{what}: {differ[:5]} differ"
                    continue
                # A batched forward rounds differently in the last bits of fp32: only scores may move.
                assert all(f.endswith(".jpg.json") for f in differ), f"{what}: {differ[:5]} differ"
                for f in differ:
                    score_diff[name] = max(score_diff[name], same_entities(got[f], reference[1][f], f"{what}: {f}"))
                json_differ[name] = max(json_differ[name], len(differ))
        entities = [len(json.loads(v)["entities"]) for k, v in reference[1].items() if k.endswith(".jpg.json")]
        rows = {}
        for name, rs in runs.items():
            phase = statistics.median(r["images_s"] for r in rs)
            forward = statistics.median(sum(r["forward"]) for r in rs)
            segment = statistics.median(sum(r["segment"]) for r in rs)
            after = [(n - r["first_n"]) / r["after_first_s"] for r in rs if r["first_n"] < n]  # none: one call
            rows[name] = {"images_per_s": n / phase, "images_per_s_all": [n / r["images_s"] for r in rs],
                          "after_first_batch_images_per_s": statistics.median(after) if after else None,
                          "command_images_per_s": n / statistics.median(r["wall_s"] for r in rs),
                          "images_phase_s": phase, "startup_s": statistics.median(r["wall_s"] - r["images_s"] for r in rs),
                          "forward_s": forward, "segment_s": segment,
                          "first_forward_s": statistics.median(r["forward"][0] for r in rs),
                          "forward_calls": len(rs[0]["forward"]),
                          "not_segment_share": 1 - segment / phase, "not_forward_share": 1 - forward / phase,
                          "cores_busy": statistics.median(r["cpu_s"] / r["images_s"] for r in rs),
                          "threads": rs[0]["threads"], "json_files_differing": json_differ[name],
                          "max_score_diff": score_diff[name]}
        base = rows["serial (--workers 0)"]["images_per_s"]
        base_after = rows["serial (--workers 0)"]["after_first_batch_images_per_s"]
        for row in rows.values():
            row["vs_serial"] = row["images_per_s"] / base
            after = row["after_first_batch_images_per_s"]
            row["after_first_batch_vs_serial"] = after / base_after if after is not None else None
        rec = record("infer_throughput", {"model": model, "config": config, "overrides": overrides, "images": n,
                                          "sizes": sorted({f"{h}x{w}" for h, w in sizes}), "reps": reps,
                                          "cpus": os.cpu_count(), "entities_per_image": statistics.mean(entities),
                                          "results": rows, "loadavg": [load0, loadavg()]})
        print(f"\n{model} ({config}{' ' + ' '.join(overrides) if overrides else ''}, random weights): {n} photos "
              f"{' + '.join(rec['sizes'])}, {rec['entities_per_image']:.1f} entities per image, {reps} rep(s), "
              f"torch threads {rows['serial (--workers 0)']['threads']}; load {rec['loadavg'][0]} -> {rec['loadavg'][1]}")
        print(f"  {'variant':28s} {'img/s':>6s} {'vs serial':>9s} {'(min-max)':>13s} {'after 1st':>9s} {'vs serial':>9s} "
              f"{'cmd img/s':>9s} {'start s':>7s} "
              f"{'forward s':>9s} {'(1st)':>6s} {'segment s':>9s} {'not seg':>7s} {'not fwd':>7s} {'cores':>5s}")
        for name, row in rows.items():
            spread = row["images_per_s_all"]
            print(f"  {name:28s} {row['images_per_s']:6.2f} {row['vs_serial']:8.2f}x {min(spread):6.2f}-{max(spread):<6.2f} "
                  + (f"{row['after_first_batch_images_per_s']:9.2f} {row['after_first_batch_vs_serial']:8.2f}x "
                     if row["after_first_batch_images_per_s"] is not None else f"{'-':>9s} {'-':>9s} ") +
                  f"{row['command_images_per_s']:9.2f} {row['startup_s']:7.1f} {row['forward_s']:9.2f} "
                  f"{row['first_forward_s']:6.2f} {row['segment_s']:9.2f} {100 * row['not_segment_share']:6.0f}% "
                  f"{100 * row['not_forward_share']:6.0f}% {row['cores_busy']:5.2f}")
        print("  outputs (.json, .ids.png, .overlay.jpg, failures.json) of --workers 2 byte-identical to serial in "
              "every repetition")
        batched = "--workers 2 --batch-size 4"
        print(f"  {batched}: .ids.png, .overlay.jpg and failures.json byte-identical; "
              f"{json_differ[batched]} of {n} entity JSONs not byte-identical (at most, per repetition): the same entities, "
              f"ids, areas, boxes and RLE masks, scores within {score_diff[batched]:.1e} (fp32 rounding of the batched forward)")
