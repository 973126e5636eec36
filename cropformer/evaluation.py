"""The entity metric AP^e (SPEC.md section 6): class-agnostic COCO segm AP with stock pycocotools.

Every ground-truth annotation and every prediction gets `category_id = 1` before COCOeval sees them
(the original needs a forked cocoapi for this); boxes are dropped from predictions. The non-overlap
constraint comes from inference (the paste op paints one entity per pixel).

Inputs are validated before pycocotools sees them (it scores malformed files as if valid, dies
inside, or hangs on an RLE whose counts do not cover the image). Every problem is an
`EvaluationInputError` whose one-line message names the file, the record and the problem, with a count
of further problems; nothing is skipped silently. Checked: JSON syntax (line and column); ground truth:
an object with `images` and `annotations` lists, images with a unique integer `id` and positive
`height`/`width` (and `file_name` when images are read), annotations with a unique `id`, a known
`image_id`, a finite `area` >= 0 and a `segmentation`: an RLE whose `size` is the image's and whose
counts are non-negative and sum to height x width, or polygons (lists of >= 6 finite numbers, even
length); predictions: a list of records with a known `image_id`, a finite `score` and a compressed RLE
`segmentation` checked as above.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class EvaluationInputError(ValueError):
    """A ground-truth or predictions file (or dict) that cannot be scored; the message names the file,
    the record and the problem."""


def read_json(path: str | Path, what: str):
    """Parse a JSON file; a missing or malformed file is an EvaluationInputError naming it (line, column)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationInputError(f"{path}: cannot read the {what} file ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvaluationInputError(f"{path}: the {what} file is not valid JSON: {exc.msg} at line {exc.lineno} "
                                   f"column {exc.colno}") from None


class _Problems:
    """Collects problems; raises the first with the count of the others."""

    def __init__(self, source: str):
        self.source, self.first, self.count = source, None, 0

    def add(self, record: str, problem: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = f"{record}: {problem}"

    def raise_any(self) -> None:
        if self.first is not None:
            more = f" (and {self.count - 1} more problems)" if self.count > 1 else ""
            raise EvaluationInputError(f"{self.source}: {self.first}{more}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def compressed_rle_sums(strings: list[str], chunk_chars: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """(sum, smallest) of the run lengths of each COCO compressed RLE counts string, decoded as
    pycocotools' `rleFrString` does, vectorised over strings (a string that does not encode whole
    numbers gets sum -1). Works through about `chunk_chars` characters at a time (bounded memory)."""
    sums, mins = np.full(len(strings), -1, np.int64), np.zeros(len(strings), np.int64)
    i = 0
    while i < len(strings):
        j, size = i, 0
        while j < len(strings) and (size < chunk_chars or j == i):
            size += len(strings[j])
            j += 1
        sums[i:j], mins[i:j] = _rle_sums(strings[i:j])
        i = j
    return sums, mins


def _rle_sums(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # Each number is 5-bit groups, low first; 0x20 = another group follows; 0x10 in the last group =
    # negative. Number m > 2 is stored as its difference to number m - 2.
    n = len(strings)
    sums, mins = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    strings = [t if t.isascii() else "\x7f" for t in strings]  # (0x7f is no valid character)
    lengths = np.fromiter(map(len, strings), np.int64, n)
    if not lengths.any():
        return sums, mins
    offsets = np.cumsum(lengths)  # end of each string
    c = np.frombuffer("".join(strings).encode("ascii"), np.uint8) - np.uint8(48)  # wraps below '0'
    bad = lengths == 0
    if c.max() >= 64:
        bad[np.searchsorted(offsets, np.flatnonzero(c >= 64), "right")] = True
    ends = (c & 0x20) == 0  # last character of a number
    nonempty = np.flatnonzero(lengths)
    last = offsets[nonempty] - 1
    bad[nonempty[~ends[last]]] = True  # a string stops inside a number
    ends[last] = True  # (so that numbers never run across strings)
    end_pos = np.flatnonzero(ends)
    starts = np.r_[0, end_pos[:-1] + 1]
    size = end_pos - starts + 1  # characters of each number
    numbers_before = np.r_[0, np.cumsum(ends)]  # numbers ending before each character
    per_string = numbers_before[offsets] - numbers_before[offsets - lengths]
    sid = np.repeat(np.arange(n), per_string)  # string of each number
    if size.max() > 12:  # more than 60 bits
        bad[sid[size > 12]] = True
    x = np.zeros(len(end_pos), np.int64)
    for k in range(min(int(size.max()), 12)):  # k-th group of every number that has one
        sel = np.flatnonzero(size > k) if k else slice(None)
        x[sel] |= (c[starts[sel] + k] & 0x1F).astype(np.int64) << (5 * k)
    neg = (c[end_pos] & 0x10) != 0
    x[neg] -= np.left_shift(1, 5 * np.minimum(size[neg], 12))
    has = np.flatnonzero(per_string)
    firsts = np.r_[0, np.cumsum(per_string[has])[:-1]]  # first number of each string that has one
    m = np.arange(len(x)) - np.repeat(firsts, per_string[has])  # index of each number inside its string
    counts = x.copy()
    for parity, m0 in ((1, 1), (0, 2)):  # undo the differences: a running sum per string and parity
        chain = ((m & 1) == parity) & (m >= m0)
        cs = np.cumsum(np.where(chain, x, 0))
        before = np.r_[0, cs][firsts]  # the running sum where each string starts
        counts = np.where(chain, cs - np.repeat(before, per_string[has]), counts)
    sums[has] = np.add.reduceat(counts, firsts)
    mins[has] = np.minimum.reduceat(counts, firsts)
    sums[bad] = -1
    return sums, mins


def _check_rle(rle: dict, hw: tuple[int, int], record: str, problems: _Problems, compressed: list, allow_list: bool) -> None:
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2 and list(size) == list(hw)):
        problems.add(record, f"RLE size {size} is not the image's [height, width] {list(hw)}")
        return
    counts = rle.get("counts")
    if isinstance(counts, bytes):  # as pycocotools.mask.encode returns it
        counts = counts.decode("latin-1")
    if isinstance(counts, str):
        compressed.append((record, counts, hw[0] * hw[1]))
    elif allow_list and isinstance(counts, list):
        if not all(_is_int(v) and v >= 0 for v in counts):
            problems.add(record, "RLE counts must be non-negative integers")
        elif sum(counts) != hw[0] * hw[1]:
            problems.add(record, f"RLE counts sum to {sum(counts)}, not height x width = {hw[0] * hw[1]}")
    else:
        problems.add(record, "RLE counts must be a compressed string" + (" or a list of run lengths" if allow_list else
                                                                           " (pycocotools.mask.encode)"))


def _check_compressed(compressed: list, problems: _Problems) -> None:
    sums, mins = compressed_rle_sums([c for _, c, _ in compressed])
    for (record, _, area), total, low in zip(compressed, sums, mins):
        if total < 0:
            problems.add(record, "RLE counts is not a valid COCO compressed string")
        elif low < 0:
            problems.add(record, "RLE counts hold a negative run length")
        elif total != area:
            problems.add(record, f"RLE counts sum to {total}, not height x width = {area}")


def _check_segmentation(seg, hw, record, problems, compressed, *, allow_polygons: bool) -> None:
    if isinstance(seg, dict):
        _check_rle(seg, hw, record, problems, compressed, allow_list=allow_polygons)
    elif allow_polygons and isinstance(seg, list) and seg:
        for poly in seg:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(map(_is_finite, poly))):
                problems.add(record, "a polygon must be a list of an even number (>= 6) of finite coordinates")
                return
    else:
        problems.add(record, "no segmentation" if not seg else "segmentation is not an RLE" + " or polygons" * allow_polygons)


def validate_ground_truth(gt, source: str = "ground truth", need_file_names: bool = False,
                          annotations: bool = True) -> dict[int, tuple[int, int]]:
    """Check a COCO ground-truth dict (see the module docstring); returns {image id: (height, width)}.
    `annotations=False` checks the top level and the images only (all that predicting needs)."""
    problems = _Problems(source)
    if not isinstance(gt, dict):
        raise EvaluationInputError(f"{source}: the top level must be an object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(gt.get(key), list):
            raise EvaluationInputError(f"{source}: '{key}' is missing or not a list")
    sizes: dict[int, tuple[int, int]] = {}
    for i, im in enumerate(gt["images"]):
        rec = f"images[{i}]" + (f" (id {im.get('id')})" if isinstance(im, dict) else "")
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            problems.add(rec, "needs an integer 'id'")
        elif im["id"] in sizes:
            problems.add(rec, "duplicate image id")
        elif not (_is_int(im.get("height")) and _is_int(im.get("width")) and im["height"] > 0 and im["width"] > 0):
            problems.add(rec, "needs positive integer 'height' and 'width'")
        elif need_file_names and not (isinstance(im.get("file_name"), str) and im["file_name"]):
            problems.add(rec, "needs a 'file_name'")
        else:
            sizes[im["id"]] = (im["height"], im["width"])
    ann_ids, compressed = set(), []
    for i, ann in enumerate(gt["annotations"] if annotations else ()):
        if not isinstance(ann, dict):
            problems.add(f"annotations[{i}]", "is not an object")
            continue
        rec = f"annotations[{i}] (id {ann.get('id')}, image_id {ann.get('image_id')})"
        if not _is_int(ann.get("id")) or ann["id"] in ann_ids:
            problems.add(rec, "needs a unique integer 'id'")
            continue
        ann_ids.add(ann["id"])
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in sizes:
            problems.add(rec, "refers to an image id that is not in 'images'")
        elif not (_is_finite(ann.get("area")) and ann["area"] >= 0):
            problems.add(rec, "needs a finite 'area' >= 0")
        else:
            _check_segmentation(ann.get("segmentation"), sizes[ann["image_id"]], rec, problems, compressed, allow_polygons=True)
    _check_compressed(compressed, problems)
    problems.raise_any()
    return sizes


def validate_predictions(preds, sizes: dict[int, tuple[int, int]], source: str = "predictions") -> None:
    """Check COCO RLE predictions against the ground truth's images (see the module docstring)."""
    if not isinstance(preds, list):
        raise EvaluationInputError(f"{source}: the top level must be a list of predictions")
    problems, compressed = _Problems(source), []
    for i, p in enumerate(preds):
        if not isinstance(p, dict):
            problems.add(f"predictions[{i}]", "is not an object")
            continue
        rec = f"predictions[{i}] (image_id {p.get('image_id')})"
        if not _is_int(p.get("image_id")) or p["image_id"] not in sizes:
            problems.add(rec, "refers to an image id that is not in the ground truth")
        elif not _is_finite(p.get("score")):
            problems.add(rec, f"score {p.get('score')!r} is not a finite number")
        else:
            _check_segmentation(p.get("segmentation"), sizes[p["image_id"]], rec, problems, compressed, allow_polygons=False)
    _check_compressed(compressed, problems)
    problems.raise_any()


def load_ground_truth(path: str | Path, need_file_names: bool = False) -> dict:
    """Read and validate a COCO ground-truth file."""
    gt = read_json(path, "ground truth")
    validate_ground_truth(gt, str(path), need_file_names)
    return gt


def _entity_gt(gt: dict) -> dict:
    gt = copy.deepcopy(gt)
    gt["categories"] = [{"id": 1, "name": "entity", "supercategory": "entity"}]
    for ann in gt.get("annotations", []):
        ann["category_id"] = 1
    return gt


def evaluate_entities(gt: str | Path | dict, predictions: list[dict], use_faster: bool = True,
                      predictions_source: str = "predictions", check_annotations: bool = True) -> dict[str, float]:
    """AP^e and friends (percent) of COCO-RLE `predictions` against a COCO ground-truth file or dict.

    Each prediction needs `image_id`, `segmentation` (COCO RLE) and `score`; both inputs are validated
    first (EvaluationInputError, see the module docstring; `predictions_source` names the predictions
    in its message; `check_annotations=False` skips the ground truth's annotations, for a dict that
    `load_ground_truth` has checked already). Uses `faster_coco_eval` when installed and `use_faster`
    (same numbers), else pycocotools.
    """
    from pycocotools.coco import COCO as coco_cls
    from pycocotools.cocoeval import COCOeval as eval_cls

    source = "ground truth"
    if not isinstance(gt, dict):
        source = str(gt)
        gt = read_json(gt, "ground truth")
    validate_predictions(predictions, validate_ground_truth(gt, source, annotations=check_annotations), predictions_source)
    gt = _entity_gt(gt)
    preds = []
    for p in predictions:
        q = {k: v for k, v in p.items() if k != "bbox"}
        q["category_id"] = 1
        preds.append(q)
    if use_faster:
        try:
            from faster_coco_eval import COCO as coco_cls  # noqa: F811
            from faster_coco_eval import COCOeval_faster as eval_cls  # noqa: F811
        except ImportError:
            pass
    import logging

    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # it logs its summary table at INFO
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not preds:
            return {name: 0.0 for name in METRIC_NAMES}
        coco_dt = coco_gt.loadRes(preds)
        ev = eval_cls(coco_gt, coco_dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=np.float64)
    # COCOeval reports -1 where an area range has no ground truth.
    return {name: float(100.0 * s) if s >= 0 else float("nan") for name, s in zip(METRIC_NAMES, stats)}


def format_table(metrics: dict[str, float]) -> str:
    names = [n for n in METRIC_NAMES if n in metrics]
    head = " | ".join(f"{('AP^e' if n == 'AP' else n):>6}" for n in names)
    row = " | ".join(f"{metrics[n]:6.2f}" for n in names)
    return f"{head}\n{'-' * len(head)}\n{row}"


def predict_dataset(segmenter, gt_json: str | Path | dict, images_dir: str | Path, *, reduced_decode: bool = False,
                    progress: bool = True) -> tuple[list[dict], dict]:
    """Run `segmenter` on every image of a COCO file or dict (this rank's share under torchrun) and
    return (COCO RLE predictions of all ranks, stats). Its images are validated first (the
    annotations where they are scored) and an unreadable `images_dir` is an EvaluationInputError; an image that fails (decode, size, out of
    memory, a model error) is logged, listed in stats["failed"] as {"path", "stage", "reason"} and
    skipped. Images are decoded at full resolution by default (the released numbers need it);
    `reduced_decode` allows OpenCV's reduced JPEG decoding when the views need fewer pixels."""
    import logging
    import os
    import time

    import torch

    from . import distributed as dist_utils
    from .cpu_share import ThreadShare
    from .data.decode import ImageDecodeError, decode_image
    from .inference import entity_records
    from .progress import Progress

    log = logging.getLogger("cropformer.eval")
    gt = gt_json if isinstance(gt_json, dict) else read_json(gt_json, "ground truth")
    validate_ground_truth(gt, str(gt_json) if not isinstance(gt_json, dict) else "ground truth", need_file_names=True,
                          annotations=False)  # the annotations are checked where they are scored
    try:
        next(os.scandir(images_dir), None)
    except OSError as exc:
        raise EvaluationInputError(f"{images_dir}: cannot read the image folder ({exc.strerror or exc})") from None
    images = sorted(gt["images"], key=lambda im: im["id"])
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    mine = images[rank::world]
    preds, times, failed = [], [], []
    bar = Progress(len(mine), "eval", enabled=progress and rank == 0)
    device = segmenter.device
    # On a CPU shared with other processes, torch gets the cores they leave free (cropformer/cpu_share.py).
    with ThreadShare(active=device.type == "cpu" and world == 1) as share:
        for info in mine:
            share.update()
            path = Path(images_dir) / info["file_name"]
            stage = "decode"
            try:
                plan = segmenter.plan(info["height"], info["width"])
                decoded = decode_image(path, scale=plan.needed_scale(), reduced=reduced_decode,
                                       expected_size=(info["height"], info["width"]))
                stage = "segment"
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                ent = segmenter.segment(decoded)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # one image (unreadable, out of memory, a model error) never stops the run
                reason = exc.reason if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
                log.warning("skipping image %s (%s): %s failed: %s", info["id"], path, stage, reason)
                failed.append({"path": str(path), "stage": stage, "reason": reason})
                bar.update(1)
                continue
            times.append(time.perf_counter() - t0)
            for rec in entity_records(ent):
                preds.append({"image_id": info["id"], "category_id": 1, "segmentation": rec["segmentation"],
                              "score": rec["predicted_iou"], "bbox": rec["bbox"], "area": rec["area"]})
            bar.update(1, s_per_img=times[-1])
    bar.close()
    all_preds = [p for part in dist_utils.all_gather_objects(preds) for p in part]
    all_times = [t for part in dist_utils.all_gather_objects(times) for t in part]
    stats = {"images": len(images), "failed": [f for part in dist_utils.all_gather_objects(failed) for f in part],
             "mean_s_per_image": float(np.mean(all_times)) if all_times else float("nan")}
    if device.type == "cuda":
        stats["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return all_preds, stats


def make_evaluator(cfg, gt_json: str | None = None, images_dir: str | None = None, out_dir: str | None = None):
    """evaluate_fn(model, iteration) for the training loop: AP^e on the validation set of `cfg`,
    written to <output_dir>/eval_<iteration>.json."""
    from .inference import Segmenter

    gt_json = gt_json or cfg.data.val_json
    images_dir = images_dir or cfg.data.val_images
    out_dir = Path(out_dir or cfg.output_dir)

    def evaluate_fn(model, iteration: int) -> dict:
        from . import distributed as dist_utils

        segmenter = Segmenter(model, cfg)
        preds, stats = predict_dataset(segmenter, gt_json, images_dir)
        metrics = evaluate_entities(gt_json, preds) if dist_utils.get_rank() == 0 else {}
        if dist_utils.get_rank() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            print(f"iteration {iteration}: AP^e on {gt_json}\n{format_table(metrics)}")
            (out_dir / f"eval_{iteration}.json").write_text(json.dumps({"iteration": iteration, "metrics": metrics, **stats}, indent=1))
        return metrics

    return evaluate_fn
