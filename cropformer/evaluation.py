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
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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
            from faster_coco_eval import COCO as FCOCO  # noqa: F401
            from faster_coco_eval import COCOeval_faster

            COCO, COCOeval = FCOCO, COCOeval_faster  # noqa: N806
        except ImportError:
            pass
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not preds:
            return {name: 0.0 for name in METRIC_NAMES}
        coco_dt = coco_gt.loadRes(preds)
        ev = COCOeval(coco_gt, coco_dt, "segm")
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
