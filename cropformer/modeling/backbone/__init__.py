"""Image encoders with the original checkpoints' parameter names; each returns res2..res5 and has
`.out_channels` / `.strides` dicts."""
from __future__ import annotations

from torch import nn

from .hornet import HorNet
from .resnet import ResNet
from .swin import SWIN_PRESETS, SwinTransformer

BACKBONES = {"swin": SwinTransformer, "hornet": HorNet, "resnet": ResNet}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build "swin", "hornet" or "resnet" with the class's keyword arguments, e.g.
    `build_backbone("swin", **SWIN_PRESETS["large"], window_size=7)`."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


__all__ = ["BACKBONES", "SWIN_PRESETS", "HorNet", "ResNet", "SwinTransformer", "build_backbone"]
