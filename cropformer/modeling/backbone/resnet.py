"""ResNet image encoder with detectron2's names (`build_resnet_backbone`, Mask2Former's Base config).

State-dict layout as detectron2: `stem.conv1.weight` + `stem.conv1.norm.*`, then `res2`..`res5`
`nn.Sequential`s of bottleneck blocks with `shortcut` (first block of a stage), `conv1`, `conv2`,
`conv3`, each a bias-free conv owning its `norm`. The norm is detectron2's "FrozenBN" default: four
persistent buffers `weight`, `bias`, `running_mean`, `running_var`, no parameters, no
`num_batches_tracked` ("BN", "SyncBN" and "GN" (32 groups) are accepted as in detectron2). Base config: depth 50, stem 64, stride in the 3x3 conv (STRIDE_IN_1X1 False),
one group, width 64 per group, res5 dilation 1, FREEZE_AT 0. Convs use detectron2's `c2_msra_fill`
(Kaiming normal, fan_out, ReLU gain).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine: y = (x - mean) / sqrt(var + eps) * weight + bias.

    All four tensors are buffers (never trained). Initial values as detectron2: weight 1, bias 0,
    running_mean 0, running_var 1 - eps (so a fresh layer is the identity).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, bn.eps).to(bn.running_mean.device)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W -> same; folded into one scale and shift per channel."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def make_norm(norm: str, channels: int) -> nn.Module:
    """detectron2's `get_norm` for the names a ResNet config uses."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {norm!r}; choose FrozenBN, BN, SyncBN or GN")


class ConvNorm(nn.Conv2d):
    """Bias-free conv followed by its own norm, named as detectron2's `Conv2d(..., norm=...)`:
    `weight` then `norm.*` in the state dict."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, norm: str = "FrozenBN"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False)
        self.norm = make_norm(norm, out_channels)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class BasicStem(nn.Module):
    """7x7 stride-2 conv + norm + ReLU, then 3x3 stride-2 max pool: stride 4."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN"):
        super().__init__()
        self.conv1 = ConvNorm(in_channels, out_channels, kernel_size=7, stride=2, padding=3, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (carries the stride unless stride_in_1x1) -> 1x1, each conv+norm, ReLU after the
    first two and after the residual sum; projection shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int = 1,
                 num_groups: int = 1, stride_in_1x1: bool = False, dilation: int = 1, norm: str = "FrozenBN"):
        super().__init__()
        # creation order = detectron2's state-dict order (shortcut first)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = ConvNorm(in_channels, out_channels, 1, stride=stride, norm=norm)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=stride_1x1, norm=norm)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, padding=dilation,
                              dilation=dilation, groups=num_groups, norm=norm)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet(nn.Module):
    """Bottleneck ResNet returning res2..res5 (channels 256, 512, 1024, 2048 for the defaults).

    Args:
        depth: 50, 101 or 152.
        norm: "FrozenBN" (detectron2's default and the Base config's), "BN", "SyncBN" or "GN".
        stem_out_channels, res2_out_channels: widths of the stem and of res2's output.
        num_groups, width_per_group: bottleneck width of res2 = num_groups * width_per_group.
        stride_in_1x1: put the stride in the first 1x1 conv (MSRA style) instead of the 3x3.
        res5_dilation: 1, or 2 (res5 then keeps stride 16 and dilates its 3x3 convs).
        freeze_at: 0 trains every conv; k >= 1 freezes the stem and the first k - 1 stages.
    Forward:
        x: N x 3 x H x W normalised images, H and W multiples of 32.
        returns {"res2".."res5": N x C_i x H / s_i x W / s_i}.
    """

    def __init__(self, *, depth: int = 50, norm: str = "FrozenBN", stem_out_channels: int = 64,
                 res2_out_channels: int = 256,
                 num_groups: int = 1, width_per_group: int = 64, stride_in_1x1: bool = False,
                 res5_dilation: int = 1, freeze_at: int = 0, in_chans: int = 3):
        super().__init__()
        if depth not in _BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {depth}")
        if res5_dilation not in (1, 2):
            raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
        self.stem = BasicStem(in_chans, stem_out_channels, norm)
        in_channels, out_channels = stem_out_channels, res2_out_channels
        bottleneck = num_groups * width_per_group
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.stage_names: list[str] = []
        stride_total = 4
        for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[depth]):
            name = f"res{idx + 2}"
            dilation = res5_dilation if idx == 3 else 1
            first_stride = 1 if idx == 0 or dilation == 2 else 2
            blocks = []
            for b in range(num_blocks):
                blocks.append(BottleneckBlock(in_channels, out_channels, bottleneck, first_stride if b == 0 else 1,
                                              num_groups, stride_in_1x1, dilation, norm))
                in_channels = out_channels
            self.add_module(name, nn.Sequential(*blocks))
            stride_total *= first_stride
            self.stage_names.append(name)
            self.out_channels[name] = out_channels
            self.strides[name] = stride_total
            out_channels *= 2
            bottleneck *= 2
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "ResNet":
        """detectron2's FREEZE_AT: freeze_at >= 1 freezes the stem, freeze_at >= k + 2 stage res{k+2}.
        Frozen parts stop taking gradients and their BatchNorms become FrozenBatchNorm2d (statistics
        and affine copied; `num_batches_tracked` dropped), as detectron2 does."""
        parts = [self.stem] if freeze_at >= 1 else []
        parts += [getattr(self, name) for idx, name in enumerate(self.stage_names) if freeze_at >= idx + 2]
        for part in parts:
            part.requires_grad_(False)
            for conv in part.modules():
                if isinstance(conv, ConvNorm) and isinstance(conv.norm, nn.modules.batchnorm._BatchNorm):
                    conv.norm = FrozenBatchNorm2d.from_batchnorm(conv.norm)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"ResNet takes N x C x H x W input, got shape {tuple(x.shape)}")
        x = self.stem(x)
        outs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs[name] = x
        return outs
