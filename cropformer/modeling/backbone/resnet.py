"""ResNet image encoder with detectron2's names (`build_resnet_backbone`, Mask2Former's Base config).

State-dict layout as detectron2: `stem.conv1.weight` + `stem.conv1.norm.*`, then `res2`..`res5`
`nn.Sequential`s of bottleneck blocks with `shortcut` (first block of a stage), `conv1`, `conv2`,
`conv3`, each a bias-free conv owning its `norm`. The norm is detectron2's "FrozenBN" default: four
persistent buffers `weight`, `bias`, `running_mean`, `running_var`, no parameters, no
`num_batches_tracked`. Base config: depth 50, stem 64, stride in the 3x3 conv (STRIDE_IN_1X1 False),
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W -> same; folded into one scale and shift per channel."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ConvNorm(nn.Conv2d):
    """Bias-free conv followed by its own norm, named as detectron2's `Conv2d(..., norm=...)`:
    `weight` then `norm.*` in the state dict."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class BasicStem(nn.Module):
    """7x7 stride-2 conv + norm + ReLU, then 3x3 stride-2 max pool: stride 4."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64):
        super().__init__()
        self.conv1 = ConvNorm(in_channels, out_channels, kernel_size=7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (carries the stride unless stride_in_1x1) -> 1x1, each conv+norm, ReLU after the
    first two and after the residual sum; projection shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int = 1,
                 num_groups: int = 1, stride_in_1x1: bool = False, dilation: int = 1):
        super().__init__()
        # creation order = detectron2's state-dict order (shortcut first)
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride=stride) if in_channels != out_channels else None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, padding=dilation,
                              dilation=dilation, groups=num_groups)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet(nn.Module):
    """Bottleneck ResNet returning res2..res5 (channels 256, 512, 1024, 2048 for the defaults).

    Args:
        depth: 50, 101 or 152.
        stem_out_channels, res2_out_channels: widths of the stem and of res2's output.
        num_groups, width_per_group: bottleneck width of res2 = num_groups * width_per_group.
        stride_in_1x1: put the stride in the first 1x1 conv (MSRA style) instead of the 3x3.
        res5_dilation: 1, or 2 (res5 then keeps stride 16 and dilates its 3x3 convs).
        freeze_at: 0 trains every conv; k >= 1 freezes the stem and the first k - 1 stages.
    Forward:
        x: N x 3 x H x W normalised images, H and W multiples of 32.
        returns {"res2".."res5": N x C_i x H / s_i x W / s_i}.
    """

    def __init__(self, *, depth: int = 50, stem_out_channels: int = 64, res2_out_channels: int = 256,
                 num_groups: int = 1, width_per_group: int = 64, stride_in_1x1: bool = False,
                 res5_dilation: int = 1, freeze_at: int = 0, in_chans: int = 3):
        super().__init__()
        if depth not in _BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {depth}")
        if res5_dilation not in (1, 2):
            raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
        self.stem = BasicStem(in_chans, stem_out_channels)
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
                                              num_groups, stride_in_1x1, dilation))
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
        """Stop gradients of the stem (freeze_at >= 1) and of stage res{k+1} for k < freeze_at
        (detectron2's FREEZE_AT). The norms are frozen anyway."""
        if freeze_at >= 1:
            self.stem.requires_grad_(False)
        for idx, name in enumerate(self.stage_names):
            if freeze_at >= idx + 2:
                getattr(self, name).requires_grad_(False)
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
