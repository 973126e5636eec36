"""Batch decoder: the image decoder's weights run again over the T views of each sample as one
memory (video-Mask2Former style, views as frames), starting from the association module's queries.

It owns no parameters: the image decoder is held without being registered as a submodule, so the state
dict has no `batch_decoder.*` keys and every parameter is counted once by the model that holds both.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .image_decoder import ImageDecoder, make_output


def view_position_encoding(num_views: int, channels: int, temperature: float = 10000.0,
                           scale: float = 2 * math.pi, device=None) -> torch.Tensor:
    """Sine encoding of the view index, added to the 2D sine encoding of every pixel of that view.

    As the original's 3D encoding (PositionEmbeddingSine3D2D): view t (0-based) sits at
    z = (t + 1) / (T + 1e-6) * scale; channel c uses the frequency f_c = temperature ** (2 * (c // 2) / F)
    with F = channels, and is sin(z / f_c) for even c, cos(z / f_c) for odd c.

    Returns:
        T x channels float32.
    """
    z = torch.arange(1, num_views + 1, dtype=torch.float32, device=device)
    z = z / (num_views + 1e-6) * scale
    dim_t = torch.arange(channels, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / channels)
    pos = z[:, None] / dim_t  # T x F
    return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)


class BatchDecoder(nn.Module):
    """Masked-attention decoding over all views of a sample, with the image decoder's weights.

    Level l's memory is the sample's T views' tokens concatenated view-major (T*h*w tokens), with the
    2D sine encoding plus the view encoding (`view_position_encoding`) as key position; the attention
    mask covers all T*h*w keys. One class-logit pair per query (shared by the views) and one mask per
    query and view.

    Args:
        image_decoder: the `ImageDecoder` whose weights (layers, norms, heads, query_embed,
            level_embed) are reused. Its `attn_backend` applies here too.
    """

    def __init__(self, image_decoder: ImageDecoder):
        super().__init__()
        # Plain attribute, not a submodule: parameters stay owned (and counted) by the image decoder.
        object.__setattr__(self, "image_decoder", image_decoder)

    def forward(self, multi_scale_features, mask_features, init_queries, num_views: int, masks: str = "all",
                resized=None, image_kv=None) -> dict:
        """
        Args:
            multi_scale_features: 3 tensors (B*T) x C_in x h_l x w_l, sample-major, view-minor.
            mask_features: (B*T) x mask_dim x H x W.
            init_queries: B x Q x C (association module output).
            num_views: T.
            masks: "all", "last" or "none": which predictions get full-size mask logits
                (`ImageDecoder.decode`).
            resized: optional (B*T) x mask_dim x h_l x w_l mask features resized to the 3 levels.
            image_kv: optional, the image decoder's key/value projections of each layer over the same
                views ((B*T) x h*w x C each, `ImageDecoder.forward(kv_out=...)`). Each layer's keys here
                are W_k (memory + 2D position + view encoding) + b_k = the image decoder's keys + W_k (view
                encoding), and its values are the image decoder's: reusing them replaces the two largest
                matmuls of every layer by one broadcast add (exact up to rounding).
        Returns:
            dict with pred_logits B x Q x (num_classes+1), pred_masks B x Q x T x H x W (final
            prediction) and aux_outputs (the earlier predictions, same shapes).
        """
        dec = self.image_decoder
        if len(multi_scale_features) != dec.num_feature_levels:
            raise ValueError(f"expected {dec.num_feature_levels} feature levels, got {len(multi_scale_features)}")
        T = num_views
        B = init_queries.shape[0]
        if mask_features.shape[0] != B * T:
            raise ValueError(
                f"mask_features has {mask_features.shape[0]} views, expected B*T = {B}*{T} (init_queries B={B})"
            )
        sizes = [tuple(x.shape[-2:]) for x in multi_scale_features]
        view_pos = view_position_encoding(T, init_queries.shape[-1], device=init_queries.device)  # T x C
        memories = positions = kv = None
        if image_kv is not None:
            kv = []
            for i, (k, v) in enumerate(image_kv):
                w_k = dec.transformer_cross_attention_layers[i].multihead_attn.in_proj_weight.chunk(3)[1]
                k_view = F.linear(view_pos.to(k.dtype), w_k)  # T x C, no bias: it is in k already
                tokens = T * k.shape[1]
                kv.append(((k.unflatten(0, (B, T)) + k_view[None, :, None]).reshape(B, tokens, -1),
                           v.reshape(B, tokens, -1)))  # view-major tokens, as the memories below
        else:
            memories, positions = [], []
            for level, x in enumerate(multi_scale_features):
                h, w = sizes[level]
                src = dec.level_memory(level, x)  # (B*T) x (h*w) x C
                memories.append(src.reshape(B, T * h * w, src.shape[-1]))  # view-major tokens
                pos2d = dec.pe_layer(x[:1])[0]  # C x h x w, the same for every view
                pos = pos2d[None] + view_pos[:, :, None, None]
                positions.append(pos.flatten(2).transpose(1, 2).reshape(1, T * h * w, -1).to(x.dtype))
        mask_features = mask_features.unflatten(0, (B, T))  # B x T x mask_dim x H x W
        if resized is not None:
            resized = [r.unflatten(0, (B, T)) for r in resized]
        predictions, _ = dec.decode(init_queries, memories, positions, sizes, mask_features, masks, resized, kv=kv)
        return make_output(predictions)
