"""The crop ensemble's gain (issue 17; paper Table 7), with error bars, in one command:

    python scripts/hires_effect.py --out hires_run                  # defaults: about 75 min, idle 2-core CPU
    python scripts/hires_effect.py --out hires_gpu --device cuda --seeds 5 --iters 3000   # GPU: not run yet

1. Generates the detail set (`cropformer.data.synthetic.make_detail_image`, seeded): twins split by
   gaps, thin structures and small discs sized in mask cells of the views at the test short side, by
   default under one cell of the full view and at least one cell of a corner crop.
2. Trains, for each seed, the tiny CropFormer (`--config`, default tiny_demo) and the Mask2Former
   baseline (the same config with model.meta_architecture=mask2former, loss.image_level_scale=1,
   test.mode=single) with the same budget (iterations x images per batch). A finished run is not
   retrained; an interrupted one resumes from its last checkpoint.
3. Evaluates every mode of Table 7 on the same checkpoints: Image-O (full_image), Batch-O (full_batch),
   Batch-C (crops), Batch-OC (full_crops), and the baseline (single): AP^e, AP50, AP75, APs/m/l,
   boundary IoU and mask IoU of each ground-truth entity's best prediction (overall, by size, by kind),
   the share of twin pairs merged into one prediction, seconds per image, and the agreement of a query's masks between the full view and a crop on the crop
   (`cropformer.experiments.cross_view_agreement`).
4. Writes <out>/hires_effect.json (every number, per seed and mean +- standard error), hires_effect.md
   (tables; whether Batch-OC beats each other mode by more than two standard errors, paired by seed)
   and hires_effect.png (bars with +-1 standard error).

Every run's and evaluation's folder is named by a hash of the settings that define it, so changing a
knob never reuses stale results and rerunning the command reuses everything already done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from cropformer.cli import run, setup_logging
from cropformer.config import load_config, to_dict
from cropformer.data.dataset import collate
from cropformer.data.decode import decode_image
from cropformer.data.synthetic import DetailSpec, make_synthetic_dataset, view_cells
from cropformer.data.views import build_sample, plan_views
from cropformer.engine import train
from cropformer.evaluation import evaluate_entities, predict_dataset
from cropformer.experiments import cross_view_agreement, entity_quality, mean_se, paired_gain, plot_error_bars
from cropformer.inference import Segmenter

log = logging.getLogger("hires_effect")

# Table 7's names for the inference modes; the baseline is its own model.
MODE_NAMES = {"full_image": "Image-O", "full_batch": "Batch-O", "crops": "Batch-C", "full_crops": "Batch-OC",
              "single": "Mask2Former"}
CROPFORMER_MODES = ("full_image", "full_batch", "crops", "full_crops")
# The decoder whose cross-view agreement each mode's fusion relies on (one-view modes have none).
AGREEMENT_OF = {"full_crops": "batch_decoder", "full_image": "image_decoder",
                "single": "image_decoder"}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "mBIoU", "mIoU", "twins_merged")
LABELS = {"AP": "AP^e", "twins_merged": "twins merged %"}
PLOT_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "mBIoU")
GAIN_METRICS = ("AP", "AP75", "APs", "mBIoU")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="hires_run", help="output folder (data, runs, results)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per model")
    p.add_argument("--iters", type=int, default=400, help="training iterations per run (both models)")
    p.add_argument("--batch", type=int, default=4, help="images per batch (both models)")
    p.add_argument("--size", type=int, nargs=2, default=(1200, 1600), metavar=("H", "W"), help="image size")
    p.add_argument("--train-images", type=int, default=48)
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--short-side", type=int, default=256, help="network short side at test (and training)")
    p.add_argument("--train-short-sides", type=int, nargs="+", default=None,
                   help="training short sides (default: --short-side)")
    p.add_argument("--crop-ratio", type=float, default=0.7, help="corner crop side / image side (train and test)")
    p.add_argument("--train-crops", type=int, default=1, help="corner crops per training image (CropFormer)")
    p.add_argument("--test-crops", type=int, default=4, choices=range(5), metavar="{0..4}",
                   help="corner crops at test (input.crop_sample_num_test; fewer than 4: see views.inference_corners)")
    p.add_argument("--modes", nargs="+", default=list(CROPFORMER_MODES), choices=CROPFORMER_MODES,
                   help="CropFormer inference modes (views used) to evaluate")
    p.add_argument("--no-baseline", action="store_true", help="skip the Mask2Former baseline")
    p.add_argument("--gap-cells", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="twin gaps and thin widths in full-view mask cells (default: one crop cell to one full-view cell)")
    p.add_argument("--blob-cells", type=float, nargs=2, default=(1.0, 2.0), metavar=("LO", "HI"),
                   help="small disc diameters in full-view mask cells")
    p.add_argument("--boundary-ratio", type=float, default=0.005,
                   help="boundary IoU band width as a fraction of the image diagonal")
    p.add_argument("--score-mode", choices=("mean_prob", "original"), default="mean_prob",
                   help="entity score: class x mean fused probability, or the released code's")
    p.add_argument("--agreement-score", type=float, default=0.5,
                   help="queries with a class score below this are left out of the cross-view agreement")
    p.add_argument("--config", default="tiny_demo", help="CropFormer config (the baseline is derived from it)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _key(obj) -> str:
    """A short stable hash of settings, used to name the folder holding their results."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def make_data(args, out: Path) -> tuple[Path, dict]:
    """The detail set's train/ and val/ splits (generated once per setting); returns (folder, design)."""
    H, W = args.size
    spec = DetailSpec.for_views(H, W, short_side=args.short_side, crop_ratio=args.crop_ratio,
                                gap_cells=tuple(args.gap_cells) if args.gap_cells else None,
                                blob_cells=tuple(args.blob_cells))
    full_cell, crop_cell = view_cells(H, W, short_side=args.short_side, crop_ratio=args.crop_ratio)
    design = {"size": [H, W], "train_images": args.train_images, "val_images": args.val_images,
              "gap_px": list(spec.gap_px), "blob_px": list(spec.blob_px)}
    data = out / f"data-{_key(design)}"
    for split, n, seed in (("train", args.train_images, 1000), ("val", args.val_images, 1001)):
        if not (data / split / "annotations.json").is_file():  # written last: its presence means complete
            log.info("generating %d %s images of %d x %d in %s", n, split, H, W, data / split)
            make_synthetic_dataset(data / split, n, (H, W), seed=seed, detail=spec)
    design.update(full_cell_px=full_cell, crop_cell_px=crop_cell, short_side=args.short_side)
    return data, design


def run_config(args, data: Path, model: str, seed: int, out: Path):
    """(config, run folder) of one training run."""
    sides = args.train_short_sides or [args.short_side]
    overrides = [
        f"data.train_json={json.dumps(str(data / 'train/annotations.json'))}",
        f"data.train_images={json.dumps(str(data / 'train/images'))}",
        f"data.val_json={json.dumps(str(data / 'val/annotations.json'))}",
        f"data.val_images={json.dumps(str(data / 'val/images'))}",
        f"input.min_size_train={json.dumps(sides)}", f"input.min_size_test={args.short_side}",
        f"input.crop_ratio={args.crop_ratio}", f"input.crop_sample_num_train={args.train_crops}",
        f"input.crop_sample_num_test={args.test_crops}",
        f"solver.max_iter={args.iters}", f"solver.ims_per_batch={args.batch}",
        f"solver.checkpoint_period={max(1, args.iters // 4)}", "test.eval_period=0", f"seed={seed}",
        *args.set,
    ]
    if model == "mask2former":
        overrides += ["model.meta_architecture=mask2former", "loss.image_level_scale=1.0", "test.mode=single"]
    cfg = load_config(args.config, overrides)
    settings = to_dict(cfg)
    settings.pop("output_dir")
    settings.pop("seed")
    settings["input"].pop("crop_sample_num_test")  # a test-time knob: the same trained run serves every value
    run_dir = out / "runs" / f"{model}-{_key(settings)}" / f"seed{seed}"
    cfg.output_dir = str(run_dir)
    return cfg, run_dir


def train_run(cfg, run_dir: Path, device: str) -> dict:
    """Train unless finished (resuming from the last checkpoint); returns timing from metrics.jsonl."""
    weights = run_dir / "model_final.safetensors"
    timing_path = run_dir / "timing.json"
    if weights.is_file():
        log.info("%s: finished earlier, not retrained", run_dir)
    else:
        ckpt = run_dir / "last_checkpoint.pth"
        log.info("%s: training %d iterations%s", run_dir, cfg.solver.max_iter, " (resuming)" if ckpt.is_file() else "")
        cpu0, load0 = time.process_time(), os.getloadavg()[0]
        train(cfg, device=device, resume=str(ckpt) if ckpt.is_file() else None)
        # Process CPU time and the load average say how far a shared machine's wall times are from idle.
        _write_json(timing_path, {"cpu_s": time.process_time() - cpu0, "loadavg_1min": [load0, os.getloadavg()[0]]})
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    return {"weights": str(weights), "median_s_per_iter": float(np.median(times)), "train_s": float(np.sum(times)),
            "train_cpu_s": timing.get("cpu_s"), "train_loadavg": timing.get("loadavg_1min")}


@torch.no_grad()
def agreement(model: torch.nn.Module, cfg, gt: dict, images: Path, device: str, min_score: float) -> dict:
    """Mean cross-view agreement over the validation set, views = full image + 4 corner crops, for the
    image decoder (query i of each view, views decoded independently) and, for CropFormer, the batch
    decoder (associated queries): what the ensemble's per-query averaging assumes."""
    sums: dict[str, list[float]] = {}
    for info in gt["images"]:
        plan = plan_views(info["height"], info["width"], short_side=cfg.input.min_size_test,
                          max_size=cfg.input.max_size_test, corners=range(4), ratio=cfg.input.crop_ratio)
        decoded = decode_image(images / info["file_name"], reduced=False, expected_size=(info["height"], info["width"]))
        sample = build_sample(decoded, plan)
        batch = collate([sample], size_divisibility=model.size_divisibility)
        out = model(batch["images"].to(device), batch["image_sizes"].to(device), run_batch_decoder=model.is_cropformer)
        decoders = {"image_decoder": (out["image"]["pred_masks"], out["image"]["pred_logits"][0])}
        if model.is_cropformer:
            decoders["batch_decoder"] = (out["batch"]["pred_masks"][0].transpose(0, 1), out["batch"]["pred_logits"][0])
        for name, (masks, logits) in decoders.items():
            total, count = cross_view_agreement(masks.cpu(), sample["image_sizes"], sample["crop_boxes"],
                                                logits.float().softmax(-1)[:, 0].cpu(), min_score=min_score)
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] += total
            acc[1] += count
    return {name: {"IoU": 100 * s / max(n, 1), "pairs": n} for name, (s, n) in sums.items()}


def evaluate_run(args, cfg, run_dir: Path, weights: str, modes: list[str]) -> dict:
    """Every mode on one checkpoint (cached in the run folder under a hash of the evaluation settings)."""
    settings = {"modes": modes, "short_side": args.short_side, "crop_ratio": args.crop_ratio,
                "test_crops": args.test_crops,
                "boundary_ratio": args.boundary_ratio, "agreement_score": args.agreement_score,
                "score_mode": args.score_mode,
                "val": cfg.data.val_json}
    path = run_dir / f"eval-{_key(settings)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    gt = json.loads(Path(cfg.data.val_json).read_text())
    result = {"settings": settings, "modes": {}}
    seg = None
    for mode in modes:
        seg = Segmenter.from_checkpoint(weights, cfg=cfg, device=args.device, mode=mode, score_mode=args.score_mode)
        t0, cpu0 = time.perf_counter(), time.process_time()
        preds, stats = predict_dataset(seg, cfg.data.val_json, cfg.data.val_images, progress=False)
        metrics = evaluate_entities(gt, preds)
        quality = entity_quality(gt, preds, boundary_ratio=args.boundary_ratio)
        result["modes"][mode] = {**{k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                                 "mBIoU": quality["mBIoU"], "mIoU": quality["mIoU"],
                                 "twins_merged": quality["twins_merged"], "quality": quality,
                                 "s_per_image": stats["mean_s_per_image"], "eval_s": time.perf_counter() - t0,
                                 "eval_cpu_s": time.process_time() - cpu0}
        log.info("%s %s: AP^e %.2f, mBIoU %.2f", run_dir, mode, metrics["AP"], quality["mBIoU"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    result["agreement"] = agreement(seg.model, cfg, gt, Path(cfg.data.val_images), args.device, args.agreement_score)
    result["agreement_s"], result["agreement_cpu_s"] = time.perf_counter() - t0, time.process_time() - cpu0
    result["loadavg_1min"] = os.getloadavg()[0]
    _write_json(path, result)
    return result


def summarise(per_seed: dict[str, list[dict]], agreements: dict[str, list[dict]]) -> dict:
    """Mean +- standard error over seeds of every metric of every mode, and Batch-OC's paired gains."""
    table = {}
    for mode, runs in per_seed.items():
        row = {m: mean_se([r[m] for r in runs]) for m in METRICS + ("s_per_image",)}
        kinds = sorted({k for r in runs for k in r["quality"]["by_kind"]})
        for k in kinds:
            for m in ("mIoU", "mBIoU"):
                row[f"{k}:{m}"] = mean_se([r["quality"]["by_kind"].get(k, {}).get(m, float("nan")) for r in runs])
        decoder = AGREEMENT_OF.get(mode)
        if decoder:
            model = "mask2former" if mode == "single" else "cropformer"
            row["agreement"] = mean_se([a[decoder]["IoU"] for a in agreements[model]])
        table[mode] = row
    gains = {}
    if "full_crops" in per_seed:
        for other, runs in per_seed.items():
            if other != "full_crops":
                gains[other] = {m: paired_gain([r[m] for r in per_seed["full_crops"]], [r[m] for r in runs])
                                for m in GAIN_METRICS}
    return {"table": table, "gains": gains}


def _fmt(ms: tuple[float, float]) -> str:
    m, se = ms
    if not np.isfinite(m):
        return "-"
    return f"{m:.2f} +- {se:.2f}" if np.isfinite(se) else f"{m:.2f}"


def markdown(summary: dict, meta: dict) -> str:
    t, modes = summary["table"], list(summary["table"])
    n = meta["seeds"]
    lines = [f"Mean +- standard error over {n} seed(s); {meta['val_images']} validation images of "
             f"{meta['design']['size'][0]} x {meta['design']['size'][1]}, test short side {meta['design']['short_side']} "
             f"(full-view mask cell {meta['design']['full_cell_px']:.1f} px, crop cell {meta['design']['crop_cell_px']:.1f} px); "
             f"{meta['iters']} iterations x {meta['batch']} images per run.", "",
             "| mode | " + " | ".join(LABELS.get(m, m) for m in METRICS) + " | agreement | s/image |",
             "|---" * (len(METRICS) + 3) + "|"]
    for mode in modes:
        row = t[mode]
        cells = [_fmt(row[m]) for m in METRICS] + [_fmt(row.get("agreement", (float("nan"),) * 2)), _fmt(row["s_per_image"])]
        lines.append(f"| {MODE_NAMES[mode]} (`{mode}`) | " + " | ".join(cells) + " |")
    kinds = sorted({k.split(":")[0] for row in t.values() for k in row if ":" in k})
    if kinds:
        lines += ["", "Best-match mask IoU / boundary IoU of ground-truth entities, by kind:", "",
                  "| mode | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        for mode in modes:
            cells = [f"{_fmt(t[mode][f'{k}:mIoU'])} / {_fmt(t[mode][f'{k}:mBIoU'])}" for k in kinds]
            lines.append(f"| {MODE_NAMES[mode]} | " + " | ".join(cells) + " |")
    if summary["gains"]:
        lines += ["", "Batch-OC minus each mode, paired by seed (mean +- standard error; **yes** = more than two "
                  "standard errors):", "", "| vs | " + " | ".join(GAIN_METRICS) + " |", "|---" * (len(GAIN_METRICS) + 1) + "|"]
        for other, g in summary["gains"].items():
            cells = []
            for m in GAIN_METRICS:
                d = g[m]
                verdict = "**yes**" if d["beats_by_2se"] else ("no" if np.isfinite(d["se"]) else "n/a (1 seed)")
                cells.append(f"{_fmt((d['mean'], d['se']))} {verdict}")
            lines.append(f"| {MODE_NAMES[other]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    data, design = make_data(args, out)
    t_data = time.perf_counter() - t_start
    models = {"cropformer": list(args.modes)} if args.no_baseline else {"cropformer": list(args.modes), "mask2former": ["single"]}
    per_seed: dict[str, list[dict]] = {}
    agreements: dict[str, list[dict]] = {}
    runs = []
    for seed in range(args.seeds):
        for model, modes in models.items():
            cfg, run_dir = run_config(args, data, model, seed, out)
            timing = train_run(cfg, run_dir, args.device)
            result = evaluate_run(args, cfg, run_dir, timing["weights"], modes)
            for mode in modes:
                per_seed.setdefault(mode, []).append(result["modes"][mode])
            agreements.setdefault(model, []).append(result["agreement"])
            runs.append({"model": model, "seed": seed, "dir": str(run_dir), **timing,
                         "eval_s": {m: result["modes"][m]["eval_s"] for m in modes},
                         "eval_cpu_s": {m: result["modes"][m]["eval_cpu_s"] for m in modes},
                         "agreement_s": result["agreement_s"], "agreement_cpu_s": result["agreement_cpu_s"],
                         "s_per_image": {m: result["modes"][m]["s_per_image"] for m in modes}})
    summary = summarise(per_seed, agreements)
    meta = {"seeds": args.seeds, "iters": args.iters, "batch": args.batch, "val_images": args.val_images,
            "design": design, "args": vars(args), "torch": torch.__version__, "device": args.device,
            "wall_s": time.perf_counter() - t_start, "data_s": t_data,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    _write_json(out / "hires_effect.json", {"meta": meta, "summary": summary, "runs": runs,
                                            "per_seed": per_seed, "agreement": agreements})
    text = markdown(summary, meta)
    (out / "hires_effect.md").write_text(text)
    t = summary["table"]
    plot_error_bars(PLOT_METRICS, {MODE_NAMES[m]: ([t[m][k][0] for k in PLOT_METRICS], [t[m][k][1] for k in PLOT_METRICS])
                                   for m in t}, out / "hires_effect.png",
                    title=f"{args.seeds} seed(s), {args.iters} iterations, {args.val_images} val images; bars: +-1 SE")
    print(text)
    print(f"wrote {out / 'hires_effect.json'}, {out / 'hires_effect.md'}, {out / 'hires_effect.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
