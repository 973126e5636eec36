"""HorNet image encoder (Rao et al. 2022, recursive gated convolutions), as CropFormer's `D2HorNet`.

Parameter names are those of the original (`downsample_layers.*`, `stages.{s}.{b}.*`, `norm0..norm3`),
so a CropFormer HorNet checkpoint's `backbone.*` entries load with `strict=True` after the prefix is
stripped. Released HorNet-L setting (the defaults here): base dim 192, depths 2-3-18-2, g^n-conv
orders 2-3-4-5 with scale s = 1/3, a 7x7 depthwise conv in stages 1-2 and a global-local filter in
stages 3-4 (FFT weights 24 x 13 and 12 x 7), layer scale 1e-6, drop-path 0.6, LayerNorm eps 1e-6.

Facts of the original kept here:
- the global-local filter splits channels in halves: a 3x3 depthwise conv on the first, an
  orthonormal rFFT filter on the second (computed in float32), and INTERLEAVES the results
  (output channel 2k from the conv half, 2k + 1 from the FFT half);
- the learned complex weight is resized bilinearly with align_corners=True to the rFFT size
  (H x (W // 2 + 1)) whenever the sizes differ, and used as is when they are equal;
- `init_weights` is never called upstream: convs/linears keep PyTorch's default init, the complex
  weight is truncated-normal with std 0.02.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch import nn

from .swin import DropPath


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a B x C x H x W map (the original's "channels_first" LayerNorm;
    same parameters `weight`, `bias`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


def resize_complex_weight(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """C x h x w x 2 (real, imag) -> C x size[0] x size[1] x 2, bilinear with align_corners=True on
    each of the real and imaginary planes; returned unchanged when the size already matches."""
    if tuple(weight.shape[1:3]) == tuple(size):
        return weight
    resized = F.interpolate(weight.permute(3, 0, 1, 2), size=tuple(size), mode="bilinear", align_corners=True)
    return resized.permute(1, 2, 3, 0)


def global_filter(x: torch.Tensor, complex_weight: torch.Tensor) -> torch.Tensor:
    """Learned global filter: irfft2(rfft2(x) * W) with orthonormal transforms, in float32.

    Args:
        x: B x C x H x W (any H, W; odd sizes included).
        complex_weight: C x h x w x 2, resized to H x (W // 2 + 1) when it differs.
    Returns:
        B x C x H x W float32.
    """
    H, W = x.shape[-2:]
    spec = torch.fft.rfft2(x.float(), dim=(2, 3), norm="ortho")  # B x C x H x (W // 2 + 1)
    weight = resize_complex_weight(complex_weight, spec.shape[2:4])
    spec = spec * torch.view_as_complex(weight.float().contiguous())
    return torch.fft.irfft2(spec, s=(H, W), dim=(2, 3), norm="ortho")


class GlobalLocalFilter(nn.Module):
    """pre-LayerNorm -> [3x3 depthwise conv | global FFT filter] on the two channel halves ->
    interleave -> post-LayerNorm. dim: channels (even)."""

    def __init__(self, dim: int, h: int = 14, w: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, bias=False, groups=dim // 2)
        self.complex_weight = nn.Parameter(torch.empty(dim // 2, h, w, 2))
        nn.init.trunc_normal_(self.complex_weight, std=0.02)
        self.pre_norm = LayerNorm2d(dim, eps=1e-6)
        self.post_norm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W -> B x C x H x W (float32 when the input is lower precision, as upstream)."""
        x = self.pre_norm(x)
        x1, x2 = torch.chunk(x, 2, dim=1)
        x1 = self.dw(x1)
        x2 = global_filter(x2, self.complex_weight)
        # interleave channels: B x C/2 x 2 x H x W -> B x C x H x W (stack promotes to the float32 of x2)
        x = torch.stack([x1, x2], dim=2)
        return self.post_norm(x.flatten(1, 2))


class GnConv(nn.Module):
    """Recursive gated convolution g^n-conv (attribute names of the original `gnconv`).

    Channel widths dims = [dim / 2^(order-1), ..., dim / 2, dim]; proj_in gives dims[0] + sum(dims)
    channels; the spatial mixer (7x7 depthwise conv, or a GlobalLocalFilter when `filter_size` is
    given) runs on the sum(dims) part, scaled by s; then p_{k+1} = pws[k](p_k) * q_{k+1}.
    """

    def __init__(self, dim: int, order: int = 5, filter_size: tuple[int, int] | None = None, s: float = 1.0):
        super().__init__()
        self.order = order
        self.dims = [dim // 2**i for i in range(order)][::-1]
        self.scale = s
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        if filter_size is None:
            self.dwconv = nn.Conv2d(sum(self.dims), sum(self.dims), kernel_size=7, padding=3, groups=sum(self.dims))
        else:
            self.dwconv = GlobalLocalFilter(sum(self.dims), h=filter_size[0], w=filter_size[1])
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList(nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W -> B x C x H x W."""
        pwa, abc = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        x = pwa * gates[0]
        for i in range(self.order - 1):
            x = self.pws[i](x) * gates[i + 1]
        return self.proj_out(x)


class Block(nn.Module):
    """x + gamma1 * gnconv(LN(x)); x + gamma2 * MLP(LN(x)) (MLP 4x, GELU, channels last)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 order: int = 5, filter_size: tuple[int, int] | None = None, s: float = 1.0):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.gnconv = GnConv(dim, order, filter_size, s)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma1 = self.gamma2 = None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W -> B x C x H x W."""
        y = self.gnconv(self.norm1(x))
        if self.gamma1 is not None:
            y = self.gamma1[:, None, None] * y
        x = x + self.drop_path(y)
        y = self.pwconv2(self.act(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1)))))
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class HorNet(nn.Module):
    """HorNet image encoder returning res2..res5.

    Args:
        base_dim: channels of stage 1 (stages have base_dim * 1, 2, 4, 8).
        depths: blocks per stage.
        orders: g^n-conv order per stage.
        gnconv_scale: s, the scale of the depthwise / filter output.
        filter_sizes: per stage, None for a 7x7 depthwise conv, or (h, w) of the global-local
            filter's complex weight.
        drop_path_rate: last block's rate; rates grow linearly over all blocks from 0.
        layer_scale_init_value: initial gamma1/gamma2 (<= 0: no layer scale).
        use_checkpoint: recompute each block in backward (activation checkpointing).
    Forward:
        x: N x 3 x H x W normalised images, H and W multiples of 32.
        returns {"res2".."res5": N x C_i x H / s_i x W / s_i}, s_i = 4, 8, 16, 32.
    """

    def __init__(self, *, base_dim: int = 192, depths: Sequence[int] = (2, 3, 18, 2),
                 orders: Sequence[int] = (2, 3, 4, 5), gnconv_scale: float = 1.0 / 3.0,
                 filter_sizes: Sequence[tuple[int, int] | None] = (None, None, (24, 13), (12, 7)),
                 drop_path_rate: float = 0.6, layer_scale_init_value: float = 1e-6,
                 use_checkpoint: bool = False, in_chans: int = 3):
        super().__init__()
        if not len(depths) == len(orders) == len(filter_sizes) == 4:
            raise ValueError("HorNet needs 4 stages (res2..res5)")
        dims = [base_dim * 2**i for i in range(4)]
        self.use_checkpoint = use_checkpoint
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.stages.append(
                nn.Sequential(
                    *(Block(dims[i], dpr[start + j], layer_scale_init_value, orders[i], filter_sizes[i], gnconv_scale)
                      for j in range(depths[i]))
                )
            )
        self.num_features = dims
        for i in range(4):
            self.add_module(f"norm{i}", LayerNorm2d(dims[i], eps=1e-6))
        self.out_channels = {f"res{i + 2}": c for i, c in enumerate(dims)}
        self.strides = {f"res{i + 2}": 4 * 2**i for i in range(4)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"HorNet takes N x C x H x W input, got shape {tuple(x.shape)}")
        outs = {}
        for i in range(4):
            x = self.downsample_layers[i](x)
            for blk in self.stages[i]:
                if self.use_checkpoint and torch.is_grad_enabled():
                    x = checkpoint.checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
            outs[f"res{i + 2}"] = getattr(self, f"norm{i}")(x).contiguous()
        return outs
