"""The entity metric AP^e (SPEC.md section 6): class-agnostic COCO segm AP with stock pycocotools.

Every ground-truth annotation and every prediction gets `category_id = 1` before COCOeval sees them
(the original needs a forked cocoapi for this); boxes are dropped from predictions. The non-overlap
constraint comes from inference (the paste op paints one entity per pixel).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _entity_gt(gt: dict) -> dict:
    gt = copy.deepcopy(gt)
    gt["categories"] = [{"id": 1, "name": "entity", "supercategory": "entity"}]
    for ann in gt.get("annotations", []):
        ann["category_id"] = 1
    return gt


def evaluate_entities(gt: str | Path | dict, predictions: list[dict], use_faster: bool = True) -> dict[str, float]:
    """AP^e and friends (percent) of COCO-RLE `predictions` against a COCO ground-truth file or dict.

    Each prediction needs `image_id`, `segmentation` (COCO RLE) and `score`. Uses `faster_coco_eval`
    when installed and `use_faster` (same numbers), else pycocotools.
    """
    from pycocotools.coco import COCO as coco_cls
    from pycocotools.cocoeval import COCOeval as eval_cls

    if not isinstance(gt, dict):
        path = Path(gt)
        try:
            gt = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read ground truth ({exc})") from None
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


def predict_dataset(segmenter, gt_json: str | Path, images_dir: str | Path, *, reduced_decode: bool = False,
                    progress: bool = True) -> tuple[list[dict], dict]:
    """Run `segmenter` on every image of a COCO file (this rank's share under torchrun) and return
    (COCO RLE predictions of all ranks, timing stats). Unreadable images are reported and skipped.
    Images are decoded at full resolution by default (the released numbers need it); `reduced_decode`
    allows OpenCV's reduced JPEG decoding when the views need fewer pixels (faster, slightly different)."""
    import logging
    import time

    import torch

    from . import distributed as dist_utils
    from .data.decode import ImageDecodeError, decode_image
    from .inference import entity_records
    from .progress import Progress

    log = logging.getLogger("cropformer.eval")
    gt = json.loads(Path(gt_json).read_text())
    images = sorted(gt.get("images", []), key=lambda im: im["id"])
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    mine = images[rank::world]
    preds, times, failed = [], [], []
    bar = Progress(len(mine), "eval", enabled=progress and rank == 0)
    device = segmenter.device
    for info in mine:
        path = Path(images_dir) / info["file_name"]
        try:
            plan = segmenter.plan(info["height"], info["width"])
            decoded = decode_image(path, scale=plan.needed_scale(), reduced=reduced_decode,
                                   expected_size=(info["height"], info["width"]))
        except ImageDecodeError as exc:
            log.warning("skipping image %s: %s", info["id"], exc)
            failed.append(str(path))
            bar.update(1)
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ent = segmenter.segment(decoded)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
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
