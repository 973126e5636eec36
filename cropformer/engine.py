"""Training loop, readable top to bottom (DETR's engine style).

`train(cfg, ...)` builds everything from the config, resumes when asked, and runs `train_one_iter` until
`solver.max_iter`, writing metrics as JSON lines, a loss-curve PNG, atomic checkpoints and, at the end,
exported weights. A NaN/Inf loss stops the run naming the iteration, the loss term and the last good
checkpoint; nothing is saved after it.

Killed at any moment (SIGKILL, power loss), a run resumes exactly: checkpoints are written atomically
(the previous one survives a kill mid-write; the temporary file is removed at the next save), and a
torn last line of metrics.jsonl is dropped with a warning. A full disk stops the run saying so and
naming the file, with the previous checkpoint intact.
"""
from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist_utils
from .allocator import tune_cpu_allocator
from .checkpoint import (
    CheckpointError,
    atomic_write,
    export_weights,
    load_model_weights,
    load_training_checkpoint,
    read_weights,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from .config import Config, from_dict, to_dict
from .cpu_share import ThreadShare
from .losses import build_criterion
from .modeling.build import build_model
from .progress import Progress
from .solver import build_optimizer, build_scheduler, clip_grad_norm
from .visualize import plot_curves

logger = logging.getLogger("cropformer.train")


# Loss terms drawn in loss_curve.png (the final-layer terms; all 24 are in metrics.jsonl).
CURVE_KEYS = ("total_loss", "loss_ce_2d", "loss_mask_2d", "loss_dice_2d", "loss_ce_3d", "loss_mask_3d",
              "loss_dice_3d", "loss_ce", "loss_mask", "loss_dice")


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_settings(cfg: Config, device: torch.device) -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype): bf16 where the GPU has it, fp16 (with a grad scaler) on older GPUs, off on CPU
    (CPU autocast is slower than fp32 for this model)."""
    if not cfg.solver.amp or device.type != "cuda":
        return False, None
    if cfg.solver.amp_dtype == "float16":
        return True, torch.float16
    if cfg.solver.amp_dtype == "bfloat16" or torch.cuda.is_bf16_supported():
        return True, torch.bfloat16
    return True, torch.float16


def move_batch(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    out["images"] = batch["images"].to(device, non_blocking=True)
    out["image_sizes"] = batch["image_sizes"].to(device)
    if "targets" in batch:
        out["targets"] = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch["targets"]]
    return out


def train_one_iter(model, criterion, optimizer, scheduler, scaler, batch, cfg: Config, amp_dtype) -> dict:
    """One optimisation step; returns the loss terms (floats), total, grad norm and lr."""
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        outputs = model(batch["images"], batch["image_sizes"])
    losses = criterion(outputs, batch["targets"])  # fp32 inside (autocast disabled there)
    total = sum(losses.values())
    values = {k: float(v.detach()) for k, v in losses.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLossError(", ".join(bad))
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    grad_norm = clip_grad_norm(model, cfg.solver.clip_value if cfg.solver.clip_gradients else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    return {"losses": values, "total_loss": float(total.detach()), "grad_norm": float(grad_norm), "lr": lr}


def make_train_loader(cfg: Config, *, rank: int, world_size: int, start_iter: int):
    """The training stream of this rank: deterministic for a seed, resumable at `start_iter`."""
    from .data.dataset import EntityDataset, build_train_loader

    if not cfg.data.train_json or not cfg.data.train_images:
        raise ValueError("no training data: set data.train_json and data.train_images (config or --set)")
    if cfg.solver.ims_per_batch % world_size:
        raise ValueError(f"solver.ims_per_batch={cfg.solver.ims_per_batch} is not divisible by {world_size} processes")
    cropformer = cfg.model.meta_architecture == "cropformer"
    dataset = EntityDataset(
        cfg.data.train_json, cfg.data.train_images, train=True,
        short_sides=cfg.input.min_size_train, max_size=cfg.input.max_size_train,
        flip_prob=0.5 if cfg.input.random_flip == "horizontal" else 0.0,
        crop_ratio=cfg.input.crop_ratio, num_train_crops=cfg.input.crop_sample_num_train if cropformer else 0,
        filter_empty=cfg.data.filter_empty, on_bad_image=cfg.data.on_bad_image, seed=cfg.seed,
    )
    return build_train_loader(
        dataset, batch_size=cfg.solver.ims_per_batch // world_size, num_workers=cfg.data.num_workers,
        seed=cfg.seed, rank=rank, world_size=world_size, start_iter=start_iter,
        size_divisibility=cfg.model.size_divisibility,
    )


def _checkpoint_payload(model, optimizer, scheduler, scaler, iteration: int, cfg: Config) -> dict:
    rng = dist_utils.all_gather_objects(rng_state())  # every rank's RNG, so a resume is exact
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "iteration": iteration,
        "rng": rng,
        "world_size": dist_utils.get_world_size(),
        "config": to_dict(cfg),
    }


def train(
    cfg: Config,
    *,
    resume: str | None = None,
    init_weights: str | None = None,
    device: str | None = None,
    evaluate_fn=None,
    stop_after: int | None = None,
) -> dict:
    """Train according to `cfg`; returns a summary dict.

    Args:
        resume: a training checkpoint to continue from (model, optimiser, schedule, RNG, position).
        init_weights: initial weights (ours or an official checkpoint), loaded non-strictly with a report.
        device: "cpu" / "cuda" (default: cuda when available).
        evaluate_fn: called as evaluate_fn(model, iteration) at test.eval_period and at the end.
        stop_after: stop (after checkpointing) once this iteration is reached, as if interrupted.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local_rank = dist_utils.init_distributed(dev.type)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
    else:
        tune_cpu_allocator()  # reuse freed memory instead of page-faulting fresh pages (cropformer/allocator.py)
    out_dir = Path(cfg.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg.model).to(dev)
    if init_weights:
        state, _ = read_weights(init_weights)
        report = load_model_weights(model, state, source=init_weights, strict=False)
        if rank == 0:
            logger.info("initial weights %s: %d missing, %d unexpected keys (missing: %s)", init_weights,
                        len(report["missing"]), len(report["unexpected"]), report["missing"][:8])
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_scheduler(optimizer, cfg.solver)
    amp_on, amp_dtype = amp_settings(cfg, dev)
    scaler = torch.amp.GradScaler("cuda") if amp_on and amp_dtype == torch.float16 else None

    start_iter = 0
    last_ckpt = None
    if resume:
        ckpt = load_training_checkpoint(resume)
        if ckpt.get("world_size", 1) != world:
            raise CheckpointError(f"{resume}: saved with {ckpt.get('world_size')} processes, resuming with {world}; "
                                  "resume with the same number of processes")
        saved_cfg = from_dict(ckpt["config"], f"{resume} (config)")
        if to_dict(saved_cfg.model) != to_dict(cfg.model):
            raise CheckpointError(f"{resume}: its model config differs from the requested one; resume with the config "
                                  "it was trained with (config.json beside it)")
        load_model_weights(model, ckpt["model"], source=resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        start_iter = ckpt["iteration"]
        set_rng_state(ckpt["rng"][rank])
        last_ckpt = resume
    else:
        seed_everything(cfg.seed + rank)  # per-rank streams for point sampling etc.
    if rank == 0:  # after the resume checks: a refused resume keeps the run's config.json
        atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(to_dict(cfg), indent=1)), what="config")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    model.train()
    loader = make_train_loader(cfg, rank=rank, world_size=world, start_iter=start_iter)
    metrics_path = out_dir / "metrics.jsonl"
    history = _read_history(metrics_path, start_iter) if rank == 0 else {}
    progress = Progress(cfg.solver.max_iter, "train", start=start_iter, enabled=rank == 0)
    end_iter = cfg.solver.max_iter if stop_after is None else min(stop_after, cfg.solver.max_iter)
    # On a CPU shared with other processes, torch gets the cores they leave free (cropformer/cpu_share.py).
    t_data = time.perf_counter()
    result = {}
    with ThreadShare(active=dev.type == "cpu" and world == 1) as share:  # given back also when a step raises
        for it, batch in zip(range(start_iter, end_iter), loader):
            batch = move_batch(batch, dev)
            data_time = time.perf_counter() - t_data
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                result = train_one_iter(net, criterion, optimizer, scheduler, scaler, batch, cfg, amp_dtype)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {it + 1}: term(s) {exc}; last good checkpoint: {last_ckpt or 'none'}"
                ) from None
            iteration = it + 1
            if rank == 0:
                record = {"iteration": iteration, "total_loss": result["total_loss"], **result["losses"],
                          "lr": result["lr"], "grad_norm": result["grad_norm"], "data_time": data_time,
                          "time": time.perf_counter() - t_data}
                if dev.type == "cuda":
                    record["max_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
                else:  # process peak RSS (Linux reports KiB), torch's threads in this iteration
                    record["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    record["threads"] = torch.get_num_threads()
                with _naming(metrics_path), open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                for key in CURVE_KEYS:
                    if key in record:
                        history.setdefault(key, []).append((iteration, record[key]))
                progress.update(1, loss=result["total_loss"], lr=result["lr"])
                if iteration % cfg.log_period == 0 or iteration == end_iter:
                    with _naming(out_dir / "loss_curve.png"):
                        plot_curves(history, out_dir / "loss_curve.png")
            if iteration % cfg.solver.checkpoint_period == 0 or iteration == end_iter:
                payload = _checkpoint_payload(model, optimizer, scheduler, scaler, iteration, cfg)
                if rank == 0:
                    save_training_checkpoint(out_dir / "last_checkpoint.pth", payload)
                    last_ckpt = str(out_dir / "last_checkpoint.pth")
                dist_utils.barrier()
            if evaluate_fn is not None and cfg.test.eval_period and iteration % cfg.test.eval_period == 0 and iteration != cfg.solver.max_iter:
                evaluate_fn(model, iteration)
                model.train()
            share.update()
            t_data = time.perf_counter()
    progress.close()
    finished = (result and end_iter == cfg.solver.max_iter) or start_iter >= cfg.solver.max_iter
    summary = {"iterations": end_iter, "output_dir": str(out_dir), "last_checkpoint": last_ckpt, **({"final": result} if result else {})}
    if finished and rank == 0:
        export_weights(model, cfg, out_dir / "model_final.safetensors")
        summary["weights"] = str(out_dir / "model_final.safetensors")
    if finished and evaluate_fn is not None:
        summary["eval"] = evaluate_fn(model, end_iter)
    return summary


@contextmanager
def _naming(path: Path):
    """Name `path` in an OSError raised while writing it (Python's write errors do not: "[Errno 28] No
    space left on device" alone)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def _read_history(path: Path, upto: int) -> dict:
    """Loss history from an earlier run's metrics file (for the curve after a resume), and the file
    rewritten (atomically) with the records up to iteration `upto`, so a resumed run does not duplicate
    iterations. A line that does not parse (the torn last line of a killed run) is dropped with a
    warning."""
    history: dict = {}
    if not path.exists():
        return history
    kept = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):  # damaged bytes: a bad line
        try:
            rec = json.loads(line)
            iteration = rec["iteration"]
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("%s:%d: dropped a line that is not a complete record (%s); a kill mid-write leaves one",
                           path, number, exc)
            continue
        if iteration > upto:
            continue
        kept.append(line)
        for k in CURVE_KEYS:
            if k in rec:
                history.setdefault(k, []).append((iteration, rec[k]))
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)), what="metrics")
    return history
