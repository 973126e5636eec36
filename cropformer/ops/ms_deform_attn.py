"""Multi-scale deformable attention (Deformable DETR), one dispatch point + torch reference.

Fast paths (C++ CPU, CUDA, Triton) are added behind `ms_deform_attn` by the kernel work (issue 3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import resolve


def ms_deform_attn_ref(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Readable reference (grid_sample based), the definition of correctness.

    Args:
        value: B x S x H x D, S = sum(h_l * w_l).
        spatial_shapes: L x 2 int64 (h, w) per level.
        level_start_index: L int64, offsets of each level in S (unused here; kept for the signature).
        sampling_locations: B x Q x H x L x P x 2, (x, y) in [0, 1] of each level; bilinear,
            zero padding outside, align_corners=False.
        attention_weights: B x Q x H x L x P.
    Returns:
        B x Q x (H * D).
    """
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # B x h*w x H x D -> B*H x D x h x w
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * H, D, int(h), int(w))
        # B x Q x H x P x 2 -> B*H x Q x P x 2
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # B*H x D x Q x P
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # B x Q x H x L x P -> B*H x 1 x Q x L*P
    attn = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1).view(B, H * D, Q)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend="auto"):
    """Multi-scale deformable attention; see `ms_deform_attn_ref` for shapes and semantics."""
    choice = resolve("ms_deform_attn", backend, value.device, value.dtype, ())
    assert choice == "torch"
    return ms_deform_attn_ref(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
