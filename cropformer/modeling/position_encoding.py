"""Sine position encoding for 2D feature maps (DETR style), shared by the pixel decoder and decoders."""
from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of the (y, x) position of every pixel of a feature map.

    For a pixel at row i, column j (0-based) without padding, with `normalize=True`:
        y = (i + 1) / (H + eps) * scale,   x = (j + 1) / (W + eps) * scale,   eps = 1e-6
    and for channel c in [0, F) (F = num_pos_feats), with f_c = temperature ** (2 * (c // 2) / F):
        pos_y[c] = sin(y / f_c) if c is even else cos(y / f_c)   (same for x)
    The output stacks pos_y (channels 0..F-1) then pos_x (channels F..2F-1). With a padding mask the
    running counts only cover valid pixels (cumulative sums of the unmasked pixels along each axis), and
    normalisation divides by the last row/column's count, as DETR does.

    Args:
        num_pos_feats: F, channels per axis (output has 2F channels; the decoders use d_model / 2).
        temperature: base of the frequency ladder.
        normalize: scale the positions to (0, scale] (DETR's normalize=True).
        scale: range of the normalised positions; only meaningful with normalize=True.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the positions of `x`'s pixels.

        Args:
            x: B x C x H x W; only its shape and device are used.
            mask: optional B x H x W bool, True on padding pixels.
        Returns:
            B x 2F x H x W float32 (an expanded view over the batch when `mask` is None).
        """
        B, _, H, W = x.shape
        if mask is None:
            # Without a mask the encoding is the same for every image: compute one and expand.
            not_mask = torch.ones((1, H, W), device=x.device, dtype=torch.bool)
        else:
            not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

        # N x H x W x F, then even channels -> sin, odd channels -> cos, interleaved back in place
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        return pos.expand(B, -1, -1, -1) if mask is None else pos

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale}")
