"""The paper's effect in miniature, on CPU: a tiny CropFormer trained on the synthetic HIGH-resolution set
(thin structures only a few pixels wide at full resolution), evaluated full-image-only versus
full image + 4 corner crops (and the other modes of paper Table 7).

    python scripts/hires_effect.py --out hires_run [--iters 300] [--size 1200 1600]

Writes <out>/hires_effect.json (AP^e per mode) and prints a table for docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cropformer.config import load_config
from cropformer.data.synthetic import make_synthetic_dataset
from cropformer.engine import train
from cropformer.evaluation import evaluate_entities, predict_dataset
from cropformer.inference import Segmenter


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="hires_run")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--size", type=int, nargs=2, default=(1200, 1600), metavar=("H", "W"))
    p.add_argument("--train-images", type=int, default=32)
    p.add_argument("--val-images", type=int, default=8)
    p.add_argument("--short-side", type=int, default=256, help="network short side (train and test)")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    for split, n, seed in (("train", args.train_images, 10), ("val", args.val_images, 11)):
        if not (data / split / "annotations.json").exists():
            make_synthetic_dataset(data / split, n, tuple(args.size), hi_res=True, seed=seed)
    cfg = load_config("tiny_demo", [
        f"data.train_json=\"{data / 'train/annotations.json'}\"", f"data.train_images=\"{data / 'train/images'}\"",
        f"data.val_json=\"{data / 'val/annotations.json'}\"", f"data.val_images=\"{data / 'val/images'}\"",
        f"input.min_size_train=[{args.short_side}]", f"input.min_size_test={args.short_side}",
        f"solver.max_iter={args.iters}", f"solver.checkpoint_period={args.iters}", f"output_dir=\"{out / 'model'}\"",
    ])
    summary = train(cfg, device="cpu")
    results = {"config": {"size": list(args.size), "short_side": args.short_side, "iters": args.iters,
                          "train_images": args.train_images, "val_images": args.val_images}}
    for mode in ("full_image", "full_batch", "crops", "full_crops"):
        seg = Segmenter.from_checkpoint(summary["weights"], mode=mode)
        preds, stats = predict_dataset(seg, cfg.data.val_json, cfg.data.val_images)
        metrics = evaluate_entities(cfg.data.val_json, preds)
        results[mode] = {"AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"],
                         "APs": metrics["APs"], "s_per_image": stats["mean_s_per_image"]}
    (out / "hires_effect.json").write_text(json.dumps(results, indent=1))
    print("| mode | AP^e | AP50 | AP75 | APs | s/image |\n|---|---|---|---|---|---|")
    for mode in ("full_image", "full_batch", "crops", "full_crops"):
        r = results[mode]
        print(f"| {mode} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['AP75']:.2f} | {r['APs']:.2f} | {r['s_per_image']:.2f} |")


if __name__ == "__main__":
    main()
