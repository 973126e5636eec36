"""Masked cross-attention (Mask2Former), one dispatch point + torch reference.

Fast paths (Triton, CUDA) are added behind `masked_cross_attention` by the kernel work (issue 4).
"""
from __future__ import annotations

import torch

from ._dispatch import resolve


def attention_block_mask(mask_logits: torch.Tensor) -> torch.Tensor:
    """B x Q x K bool, True = blocked: logit < 0 (sigmoid < 0.5), rows fully blocked are fully opened."""
    blocked = mask_logits < 0
    return blocked & ~blocked.all(dim=-1, keepdim=True)


def masked_cross_attention_ref(q, k, v, mask_logits):
    """Readable reference, the definition of correctness.

    Args:
        q: B x H x Q x D; k, v: B x H x K x D.
        mask_logits: B x Q x K, shared by all heads. Key j is blocked for query i when
            mask_logits[b, i, j] < 0, except that a row with every key blocked attends to all keys.
    Returns:
        B x H x Q x D. The mask is broadcast over heads, never expanded per head.
    """
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # B x H x Q x K
    blocked = attention_block_mask(mask_logits).unsqueeze(1)  # B x 1 x Q x K
    scores = scores.masked_fill(blocked, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def masked_cross_attention(q, k, v, mask_logits, backend="auto"):
    """Masked cross-attention; see `masked_cross_attention_ref` for shapes and semantics."""
    choice = resolve("masked_cross_attention", backend, q.device, q.dtype, ())
    assert choice == "torch"
    return masked_cross_attention_ref(q, k, v, mask_logits)
