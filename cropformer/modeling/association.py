"""Association module (the original's `Make3dQueries`): the full view's final image-decoder queries
gather, by cross-attention, the same queries' features from all T views of the sample, giving the
batch decoder's initial queries.
"""
from __future__ import annotations

import torch
from torch import nn

from .image_decoder import CrossAttentionLayer, FFNLayer, SelfAttentionLayer


class AssociationModule(nn.Module):
    """num_layers x (cross-attention -> self-attention without position -> FFN).

    Args:
        d_model: C (must equal the image decoder's hidden_dim).
        nheads, dim_feedforward: attention heads and FFN width (the original: 8 and 2048 for every size).
        num_layers: number of layer triples (1 in every released config).
        pre_norm: pre-norm layers instead of post-norm.
    """

    def __init__(self, *, d_model: int = 256, nheads: int = 8, dim_feedforward: int = 2048, num_layers: int = 1,
                 pre_norm: bool = False):
        super().__init__()
        self.cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d_model, nheads, normalize_before=pre_norm) for _ in range(num_layers)
        )
        self.self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d_model, nheads, normalize_before=pre_norm) for _ in range(num_layers)
        )
        self.ffn_layers = nn.ModuleList(
            FFNLayer(d_model, dim_feedforward, normalize_before=pre_norm) for _ in range(num_layers)
        )

    def forward(self, query_features: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """
        Args:
            query_features: B x T x Q x C final image-decoder query features (before decoder_norm);
                view 0 is the full image.
            query_pos: Q x C, the image decoder's query_embed.
        Returns:
            B x Q x C initial batch-decoder queries.
        """
        B, T, Q, C = query_features.shape
        output = query_features[:, 0]
        # Keys/values: all views' queries, query-major then view (token q*T + t), each with its query's
        # position; the attention is unmasked, so the order only fixes the summation order.
        memory = query_features.transpose(1, 2).reshape(B, Q * T, C)
        memory_pos = query_pos.repeat_interleave(T, dim=0)  # (Q*T) x C
        for cross, self_attn, ffn in zip(self.cross_attention_layers, self.self_attention_layers, self.ffn_layers):
            output = cross(output, memory, pos=memory_pos, query_pos=query_pos)
            output = self_attn(output)
            output = ffn(output)
        return output
