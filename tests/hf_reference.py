"""HuggingFace transformers' Mask2Former built to match one of our configs, randomised, and its weights
copied into ours: shared by the parity test (tests/modeling/test_hf_parity.py), the converter's tests and
the end-to-end benchmark against HF (tests/bench/test_bench_hf_end_to_end.py). Needs transformers."""
from __future__ import annotations

import re

import torch
from torch import nn

from cropformer.convert import hf_to_ours


def build_hf(cfg):
    """HF Mask2Former with the same architecture as our config `cfg` (a ModelConfig)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    s, p, d = cfg.backbone.swin, cfg.pixel_decoder, cfg.decoder
    # What HF hard-codes: one head count for pixel decoder and decoder, 4 sampling points, 3 levels,
    # GroupNorm(32), no input projection in the decoder when widths agree.
    assert cfg.backbone.name == "swin" and p.num_heads == d.nheads and p.num_points == 4
    assert p.norm == "GN" and p.deform_features == ("res3", "res4", "res5") and p.conv_dim == d.hidden_dim
    swin = SwinConfig(
        embed_dim=s.embed_dim, depths=list(s.depths), num_heads=list(s.num_heads), window_size=s.window_size,
        mlp_ratio=s.mlp_ratio, qkv_bias=s.qkv_bias, patch_size=s.patch_size, drop_path_rate=0.0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    hf_cfg = Mask2FormerConfig(
        backbone_config=swin, feature_size=p.conv_dim, mask_feature_size=p.mask_dim, hidden_dim=d.hidden_dim,
        encoder_feedforward_dim=p.ffn_dim, encoder_layers=p.num_layers, decoder_layers=d.dec_layers,
        num_attention_heads=d.nheads, dim_feedforward=d.dim_feedforward, pre_norm=d.pre_norm,
        num_queries=d.num_queries, common_stride=p.common_stride, num_labels=cfg.num_classes, dropout=0.0,
    )
    return Mask2FormerForUniversalSegmentation(hf_cfg).eval()


@torch.no_grad()
def randomise_(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values, far from the usual init.

    The inits leave many tensors at 0 or 1 (deformable attention weights and offsets, norms, biases),
    which would hide a wrong mapping of exactly those tensors. Norm scales 1 + 0.2 N(0,1), every bias
    0.2 N(0,1), embeddings N(0,1), matrices N(0, 1/fan_in).
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen)
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                value = (1.0 if name == "weight" else 0.0) + 0.2 * noise
            elif isinstance(module, nn.Embedding) or name == "level_embed":
                value = noise
            elif p.dim() > 1:
                value = noise / p[0].numel() ** 0.5
            else:
                value = 0.2 * noise
            p.copy_(value)


def load_hf_into_ours(hf, ours) -> None:
    """Copy HF's weights into ours (strict); HF's relative position indices (non-persistent buffers
    there, persistent in the original's state dict) must equal ours."""
    state = hf_to_ours(hf.state_dict())
    for name, buf in hf.named_buffers():
        m = re.match(r"^model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention"
                     r"\.relative_position_bias\.relative_position_index$", name)
        if m:
            key = f"image_encoder.layers.{m[1]}.blocks.{m[2]}.attn.relative_position_index"
            mine = ours.state_dict()[key]
            assert torch.equal(buf.view_as(mine), mine), f"relative position index differs at {key}"
            state[key] = buf.view_as(mine).clone()
    ours.load_state_dict(state, strict=True)
