"""Optimiser and learning-rate schedule of SPEC.md section 4."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import SolverConfig

_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


def param_groups(model: nn.Module, cfg: SolverConfig) -> list[dict]:
    """AdamW groups: lr x backbone_multiplier under the image encoder; weight decay 0 for norm layers,
    nn.Embedding weights and Swin relative-position tables. Every parameter appears once (shared
    modules are visited once), so the batch decoder's shared weights are not double-counted.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr = cfg.base_lr
            wd = cfg.weight_decay
            if module_name.startswith("image_encoder"):
                lr *= cfg.backbone_multiplier
            if isinstance(module, _NORM_TYPES) or getattr(module, "is_norm", False):
                wd = cfg.weight_decay_norm
            elif isinstance(module, nn.Embedding):
                wd = cfg.weight_decay_embed
            elif "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                wd = 0.0
            groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. Fused (one vectorised kernel per parameter) where every parameter is a
    float tensor on the CPU or a CUDA GPU: torch's default on CPU is a loop of about ten small ops per
    parameter (the tiny demo's step: 17 ms against 3.4-4 ms fused, 224 tensors; docs/BENCHMARKS.md).
    The update is AdamW's up to float rounding (tests/test_engine.py)."""
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.base_lr, weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(iteration: int, cfg: SolverConfig) -> float:
    """Multiplier of the base lr at `iteration` (0-based): poly (the original's) or step (the paper's)."""
    if cfg.warmup_iters and iteration < cfg.warmup_iters:
        warm = (iteration + 1) / cfg.warmup_iters
    else:
        warm = 1.0
    if cfg.schedule == "poly":
        return warm * (1.0 - iteration / cfg.max_iter) ** cfg.poly_power
    if cfg.schedule == "step":
        return warm * cfg.gamma ** sum(iteration >= s for s in cfg.steps)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Full-model L2 gradient-norm clipping (the original's "full_model" clip type); returns the norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm <= 0 or math.isinf(max_norm):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
