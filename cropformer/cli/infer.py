"""Segment every entity of your images ("segment everything"), in batch.

    python infer.py --ckpt model_final.safetensors --input photos/ --out results/
    python infer.py --ckpt ... --input "photos/**/*.jpg" --out results/ --device cuda
    python infer.py --ckpt ... --input list.txt --out results/        # one image path per line

A folder is searched recursively (skipping --out when it lies inside). For every image, at its path
REL relative to the input folder (for a glob, a list or one file: relative to the folder all inputs
share), it writes into --out:
    REL.ids.png       entity id map at original resolution (0 = no entity, k = entity k; 16-bit PNG
                      when there are more than 255 entities)
    REL.overlay.jpg   semi-transparent colours and entity boundaries over the image (longest side capped
                      by --overlay-max-side to keep huge images cheap; 0 = original size)
    REL.json          {"image": path, "image_bytes", "image_mtime_ns", "height", "width", "entities":
                      [{"id", "score", "area", "bbox" (XYWH), "segmentation" (COCO RLE)}]}, written last
    failures.json     {"total", "segmented", "skipped", "failed": [{"path", "stage", "reason"}]} of this run
REL keeps the extension, so a.jpg, a.png and sub/a.jpg get their own outputs. Inputs are never written
over: no input may lie inside --out (refused, exit 2), and every file is written to a temporary name in
its folder and renamed into place, so an interruption leaves no partial output under a final name.
Resume: an image is skipped when its three outputs exist and its JSON records the same input file
(path, size, modification time). One image failing (decode, segment, write; stage and reason in
failures.json) never stops the batch; the exit status is 1 when any image failed or none was found.
Throughput: --workers threads (default 2) decode the next images and write the last ones' outputs while
the network runs; --batch-size N runs N images per network call (worth it on a GPU; the same entities,
scores may differ in the last bits of fp32). --workers 0 is the plain one-at-a-time loop; both give the
same files. On a 2-core CPU the three run at the same images/s (file work is 1-10% of the time there;
tests/bench/test_bench_infer_throughput.py). Memory stays bounded on any image size: JPEGs are
decoded at reduced resolution when the network needs fewer pixels, and the fused paste never holds
per-query full-resolution maps.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from . import UserError, add_common_options, debug_requested, describe_os_error, setup_logging

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
OUTPUT_SUFFIXES = (".ids.png", ".overlay.jpg", ".json")  # the JSON last: it marks the image done
REPORT = "failures.json"
MAX_LISTED = 20  # failures printed in the summary (all of them are in the report)


def list_inputs(spec: str, out: Path) -> tuple[list[Path], Path]:
    """(images, root): a folder (its images, recursively, sorted, --out skipped), a glob pattern, a .txt
    list of paths, or one image file; `root` is the folder that output names are relative to."""
    p = Path(spec)
    if p.is_dir():
        skip = out.resolve()
        found = []
        for folder, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if Path(folder, d).resolve() != skip)
            found += [Path(folder, f) for f in files if Path(f).suffix.lower() in IMAGE_EXTS]
        return sorted(found), p
    if p.suffix.lower() == ".txt" and p.is_file():
        found = [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
    elif p.is_file():
        found = [p]
    else:
        found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not found:
            raise UserError(f"--input {spec!r}: no such folder, file, list or matching images")
    root = Path(os.path.commonpath([os.path.abspath(f.parent) for f in found])) if found else Path(".")
    return found, root


def output_paths(out: Path, rel: Path) -> list[Path]:
    """The three outputs of the input at `rel`: its relative path plus a suffix (unique per input)."""
    return [out / rel.parent / (rel.name + s) for s in OUTPUT_SUFFIXES]


def refuse_inputs_inside(out: Path, paths: list[Path]) -> None:
    """The rule that keeps inputs safe: no input may lie inside --out (so no output can replace one)."""
    out_real = out.resolve()
    for path in paths:
        if out_real in path.resolve().parents:
            raise UserError(f"--out {out}: contains the input {path}; outputs could replace inputs, "
                            "choose an output folder that holds none of the inputs")


def source_key(path: Path) -> dict:
    """What resume compares: the input's path, size and modification time."""
    st = path.stat()
    return {"image": str(path), "image_bytes": st.st_size, "image_mtime_ns": st.st_mtime_ns}


def already_done(outputs: list[Path], key: dict) -> bool:
    if not all(f.is_file() for f in outputs):
        return False
    try:
        meta = json.loads(outputs[-1].read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in key.items())


def write_outputs(outputs: list[Path], key: dict, ent, image_rgb, overlay_max_side: int) -> None:
    """Write the id map, the overlay and (last) the JSON, each atomically."""
    import cv2
    import numpy as np

    from ..checkpoint import atomic_write
    from ..inference import entity_records
    from ..visualize import overlay

    ids_path, overlay_path, json_path = outputs
    id_map = ent.id_map
    H, W = id_map.shape
    # Overlay at a capped size: the id map is resized with nearest, the image with area averaging.
    scale = 1.0 if overlay_max_side <= 0 else min(1.0, overlay_max_side / max(H, W))
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    img = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA) if image_rgb.shape[:2] != (size[1], size[0]) else image_rgb
    ids = cv2.resize(id_map, size, interpolation=cv2.INTER_NEAREST) if scale != 1.0 else id_map
    vis = cv2.cvtColor(overlay(img, ids), cv2.COLOR_RGB2BGR)
    for path, ext, array, params in ((ids_path, ".png", id_map.astype(np.uint16 if id_map.max() > 255 else np.uint8), []),
                                     (overlay_path, ".jpg", vis, [cv2.IMWRITE_JPEG_QUALITY, 90])):
        ok, buf = cv2.imencode(ext, array, params)
        if not ok:
            raise OSError(f"cannot encode {path}")
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.tobytes()))
    entities = [{"id": k + 1, "score": r["predicted_iou"], "area": r["area"], "bbox": r["bbox"],
                 "segmentation": r["segmentation"]} for k, r in enumerate(entity_records(ent))]
    text = json.dumps({**key, "height": H, "width": W, "entities": entities})
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))


class _Inline:
    """The executor of --workers 0: runs each task at once, in this thread (today's serial loop)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    return getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"  # ImageDecodeError has a reason


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cropformer infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="weights: ours or an official checkpoint")
    p.add_argument("--cfg", help="config file or name (needed when the checkpoint stores none)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. input.crop_sample_num_test=2 input.min_size_test=1024")
    p.add_argument("--input", required=True, help="image folder (recursive), glob pattern, .txt list, or one image")
    p.add_argument("--out", required=True, help="output folder (must not hold any input)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=["full_crops", "full_batch", "full_image", "crops", "single"])
    p.add_argument("--score-mode", choices=["mean_prob", "original"])
    p.add_argument("--min-area", type=int)
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32: exact (the original's outputs); bf16: fast mode where the hardware computes "
                        "bfloat16 natively (AVX512-BF16/AMX CPUs, recent GPUs), refused elsewhere")
    p.add_argument("--overlay-max-side", type=int, default=2048)
    p.add_argument("--full-decode", action="store_true", help="decode JPEGs at full resolution (parity path)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads decoding ahead and writing behind the network (0: one image at a time)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per network call (views of equal padded size share a forward; worth it on a GPU)")
    add_common_options(p)
    return p


def main(argv=None) -> int:
    setup_logging()
    p = build_parser()
    args = p.parse_args(argv)
    if args.workers < 0 or args.batch_size < 1:
        p.error("--workers must be >= 0 and --batch-size >= 1")

    from ..checkpoint import atomic_write
    from ..config import load_config
    from ..cpu_share import ThreadShare
    from ..data.decode import decode_image, read_image_info
    from ..inference import Segmenter
    from ..progress import Progress

    log = logging.getLogger("cropformer.infer")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    paths, root = list_inputs(args.input, out)
    refuse_inputs_inside(out, paths)
    if not paths:
        print(f"no images found in {args.input} (extensions: {', '.join(sorted(IMAGE_EXTS))})")
        return 1
    seg = Segmenter.from_checkpoint(args.ckpt, cfg=load_config(args.cfg) if args.cfg else None, overrides=args.set,
                                    device=args.device,
                                    mode=args.mode, score_mode=args.score_mode, min_area=args.min_area,
                                    score_threshold=args.score_threshold, precision=args.precision)
    out.mkdir(parents=True, exist_ok=True)
    bar = Progress(len(paths), "infer")
    counts = {"done": 0, "skipped": 0}
    failures = []

    def prepare(path: Path, outputs: list[Path]):
        """Decode stage (a worker thread): None when already done, else (key, decoded image)."""
        key = source_key(path)
        if already_done(outputs, key):
            return None
        info = read_image_info(path)
        return key, decode_image(path, scale=seg.plan(info.height, info.width).needed_scale(), reduced=not args.full_decode)

    def failed(path: Path, stage: str, exc: BaseException, outputs: list[Path]) -> None:
        # Any failure of one image (a bad file, out of memory, a model error) spares the batch.
        if debug_requested(argv):
            raise exc
        reason = failure_reason(exc)
        log.warning("%s: %s failed: %s", path, stage, reason)
        failures.append({"path": str(path), "stage": stage, "reason": reason})
        if stage == "write":  # all three outputs or none
            for f in outputs:
                with contextlib.suppress(OSError):
                    f.unlink(missing_ok=True)
        if stage == "segment" and args.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        bar.update(1, failed=len(failures))

    def finish_write(item, future) -> None:
        try:
            future.result()
            counts["done"] += 1
            bar.update(1, failed=len(failures))
        except Exception as exc:
            failed(item[0], "write", exc, item[1])

    def segment(batch: list) -> list:
        """Network stage (this thread): a batch of decoded images, or one at a time when the batch fails,
        so that only the image at fault is reported."""
        images = [decoded for _, _, _, decoded in batch]
        try:
            return list(zip(batch, seg.segment_batch(images)))
        except Exception:
            if len(batch) == 1:
                raise
        results = []
        for item in batch:
            try:
                results.append((item, seg.segment(item[3])))
            except Exception as exc:
                failed(item[0], "segment", exc, item[1])
        return results

    # Three stages overlap: `workers` threads decode ahead and write behind while this thread runs the
    # network (OpenCV's and PIL's codecs and zlib release the GIL, so threads suffice and no image is
    # copied between processes). Outputs and failures.json are the same as with --workers 0 (serial).
    items = [(path, output_paths(out, Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))))
             for path in paths]
    lookahead = args.batch_size + 2 * args.workers  # images decoded or waiting to be written: bounds memory
    # On a CPU shared with other processes, torch gets the cores they leave free (cropformer/cpu_share.py).
    with ThreadShare(active=seg.device.type == "cpu") as share, \
         (ThreadPoolExecutor(args.workers) if args.workers else _Inline()) as decoders, \
         (ThreadPoolExecutor(args.workers) if args.workers else _Inline()) as writers:
        decoding = deque()
        writing = deque()
        next_item = 0
        batch = []
        while next_item < len(items) or decoding or batch:
            while next_item < len(items) and len(decoding) + len(writing) < lookahead:
                item = items[next_item]
                decoding.append((item, decoders.submit(prepare, *item)))
                next_item += 1
            if decoding:
                item, future = decoding.popleft()
                try:
                    prepared = future.result()
                except Exception as exc:
                    failed(item[0], "decode", exc, item[1])
                else:
                    if prepared is None:
                        counts["skipped"] += 1
                        bar.update(1, failed=len(failures))
                    else:
                        batch.append((*item, *prepared))
            if batch and (len(batch) == args.batch_size or not (decoding or next_item < len(items))):
                try:
                    results = segment(batch)
                except Exception as exc:
                    failed(batch[0][0], "segment", exc, batch[0][1])
                    results = []
                batch = []
                share.update()
                for (path, outputs, key, decoded), ent in results:
                    writing.append(((path, outputs), writers.submit(write_outputs, outputs, key, ent, decoded.image,
                                                                   args.overlay_max_side)))
            while writing and (writing[0][1].done() or len(writing) > lookahead // 2):
                finish_write(*writing.popleft())
        while writing:
            finish_write(*writing.popleft())
    done, skipped = counts["done"], counts["skipped"]
    bar.close()
    report = {"total": len(paths), "segmented": done, "skipped": skipped, "failed": failures}
    atomic_write(out / REPORT, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    for f in failures[:MAX_LISTED]:
        print(f"failed: {f['path']}: {f['stage']}: {f['reason']}")
    if len(failures) > MAX_LISTED:
        print(f"... and {len(failures) - MAX_LISTED} more")
    print(f"{done} segmented, {skipped} already done (skipped), {len(failures)} failed -> {out}"
          + (f"; failures listed in {out / REPORT}" if failures else ""))
    return 1 if failures else 0
