"""The README's main job on a fresh CPU machine: synthetic data -> train the tiny model -> AP^e ->
loss curve and mask overlays. `python train.py --demo` calls `run_demo`."""
from __future__ import annotations

import errno
import logging
from pathlib import Path

from .config import Config

logger = logging.getLogger("cropformer.demo")


def ensure_synthetic(cfg: Config, num_train: int = 64, num_val: int = 16, size=(256, 320)) -> None:
    """Generate the synthetic train/val sets named in `cfg.data` when they do not exist yet."""
    from .data.synthetic import make_synthetic_dataset

    for json_path, n, seed in ((cfg.data.train_json, num_train, 0), (cfg.data.val_json, num_val, 1)):
        if json_path and not Path(json_path).exists():
            root = Path(json_path).parent
            logger.info("generating %d synthetic images in %s", n, root)
            make_synthetic_dataset(root, n, size, seed=seed)


def write_overlays(segmenter, cfg: Config, out_dir: Path, limit: int = 8) -> list[str]:
    """Overlays (image | prediction | ground truth) of the first validation images."""
    import cv2
    import numpy as np
    from pycocotools import mask as mask_util

    from .data.decode import decode_image
    from .evaluation import read_json
    from .visualize import overlay

    gt = read_json(cfg.data.val_json, "ground truth")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for info in gt["images"][:limit]:
        image = decode_image(Path(cfg.data.val_images) / info["file_name"]).image
        ent = segmenter.segment(image)
        gt_map = np.zeros(image.shape[:2], np.int32)
        for k, ann in enumerate(a for a in gt["annotations"] if a["image_id"] == info["id"]):
            gt_map[mask_util.decode(ann["segmentation"]).astype(bool)] = k + 1
        panel = np.concatenate([image, overlay(image, ent.id_map), overlay(image, gt_map)], axis=1)
        path = out_dir / f"{Path(info['file_name']).stem}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR)):  # OpenCV returns False, never raises
            raise OSError(errno.EIO, "could not write the overlay (disk full or not writable?)", str(path))
        written.append(str(path))
    return written


def run_demo(cfg: Config, device: str = "cpu", resume: str | None = None) -> dict:
    from .engine import train
    from .evaluation import make_evaluator
    from .inference import Segmenter

    ensure_synthetic(cfg)
    evaluate_fn = make_evaluator(cfg)
    untrained = None
    if resume is None:
        import torch

        from .modeling.build import build_model

        torch.manual_seed(cfg.seed)
        untrained = evaluate_fn(build_model(cfg.model).to(device), 0)  # the baseline to beat
    summary = train(cfg, resume=resume, device=device, evaluate_fn=evaluate_fn)
    if summary.get("weights"):
        seg = Segmenter.from_checkpoint(summary["weights"], device=device)
        summary["overlays"] = write_overlays(seg, cfg, Path(cfg.output_dir) / "overlays")
        summary["loss_curve"] = str(Path(cfg.output_dir) / "loss_curve.png")
    if untrained is not None:
        summary["untrained_AP"] = untrained.get("AP")
    return summary
