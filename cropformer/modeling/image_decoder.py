"""Image decoder: the Mask2Former masked-attention transformer decoder, run on every view.

Parameter names follow the original (`sem_seg_head.predictor.*` minus `make_3d`), so a released
checkpoint loads by prefix renaming alone. The layer classes (`CrossAttentionLayer`,
`SelfAttentionLayer`, `FFNLayer`) and `MLP` are reused by the association module, and the decoding
loop (`ImageDecoder.decode`) is reused with the same weights by the batch decoder.

Layout: everything is batch-first here (B x Q x C queries, B x K x C memory); the original is
sequence-first, which changes no arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.masked_attention import masked_cross_attention
from .position_encoding import PositionEmbeddingSine

MASK_OUTPUTS = ("all", "last", "none")  # which predictions get full-size mask logits (`ImageDecoder.decode`)


def _xavier_reset(module: nn.Module) -> None:
    """xavier_uniform on every parameter with dim > 1, as each of the original's layers does at init."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class CrossAttentionLayer(nn.Module):
    """Queries attend to a memory (masked when `mask_logits` is given), residual, LayerNorm.

    The `nn.MultiheadAttention` module is kept for its parameter names (`multihead_attn.in_proj_weight`
    ...), but its forward is not used: q, k, v are projected with its weights and the attention runs
    through `cropformer.ops.masked_cross_attention`, so the fast kernels apply.

    Args:
        d_model: C, query and memory width.
        nhead: number of heads (C must be divisible by it).
        normalize_before: pre-norm instead of the default post-norm.
    """

    def __init__(self, d_model: int, nhead: int, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_reset(self)

    def project_kv(self, key, value):
        """The key and value projections: B x K x C each -> (k, v) B x K x C (heads not split)."""
        _, w_k, w_v = self.multihead_attn.in_proj_weight.chunk(3)
        _, b_k, b_v = self.multihead_attn.in_proj_bias.chunk(3)
        return F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def attend(self, query, key, value, mask_logits=None, backend="auto", kv=None):
        """Multi-head attention with the module's weights.

        Args:
            query: B x Q x C; key, value: B x K x C (or broadcastable over B).
            mask_logits: optional B x Q x K; key j is blocked for query i where it is < 0, rows with
                every key blocked are fully opened (see `masked_cross_attention_ref`).
            backend: attention backend of `masked_cross_attention`.
            kv: optional (k, v), `project_kv(key, value)` already computed; key and value are then unused.
        Returns:
            B x Q x C (after the output projection).
        """
        mha = self.multihead_attn
        heads = mha.num_heads
        w_q = mha.in_proj_weight.chunk(3)[0]
        b_q = mha.in_proj_bias.chunk(3)[0]

        def split(x):  # B x L x C -> B x H x L x D
            return x.unflatten(-1, (heads, -1)).transpose(1, 2)

        q = split(F.linear(query, w_q, b_q))
        k, v = map(split, kv if kv is not None else self.project_kv(key, value))
        if mask_logits is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = masked_cross_attention(q, k, v, mask_logits, backend=backend)
        return mha.out_proj(out.transpose(1, 2).flatten(2))

    def forward(self, tgt, memory, mask_logits=None, pos=None, query_pos=None, backend="auto", kv=None):
        """
        Args:
            tgt: B x Q x C queries; memory: B x K x C.
            mask_logits: optional B x Q x K attention-mask logits (detached by the caller).
            pos: positional encoding added to the keys (B x K x C or broadcastable); query_pos: to the
                queries (B x Q x C or Q x C). Values get no position.
            backend: attention backend (see `cropformer.ops.masked_cross_attention`).
            kv: optional (k, v) = `project_kv(memory + pos, memory)`, computed by the caller (memory and
                pos are then unused).
        Returns:
            B x Q x C.
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        key = None if kv is not None else _with_pos(memory, pos)
        tgt = tgt + self.attend(_with_pos(x, query_pos), key, memory, mask_logits, backend, kv)
        return tgt if self.normalize_before else self.norm(tgt)


class SelfAttentionLayer(nn.Module):
    """Queries attend to each other (no mask), residual, LayerNorm; the position goes into q and k only."""

    def __init__(self, d_model: int, nhead: int, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_reset(self)

    def forward(self, tgt, query_pos=None):
        """tgt: B x Q x C; query_pos: optional B x Q x C or Q x C. Returns B x Q x C."""
        x = self.norm(tgt) if self.normalize_before else tgt
        qk = _with_pos(x, query_pos)
        tgt = tgt + self.self_attn(qk, qk, x, need_weights=False)[0]
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Linear -> ReLU -> Linear, residual, LayerNorm."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_reset(self)

    def forward(self, tgt):
        """tgt: B x Q x C. Returns B x Q x C."""
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.linear2(F.relu(self.linear1(x)))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (not after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class ImageDecoder(nn.Module):
    """Mask2Former masked-attention decoder.

    One prediction from the learnable queries, then `num_layers` layers; layer i attends to level
    i % 3 of the multi-scale features (stride 32, 16, 8 in that order) through masked cross-attention
    (mask = previous prediction resized to the level, detached; sigmoid < 0.5 blocks, fully blocked rows
    are opened), then self-attention, then FFN. After each step: `decoder_norm`, `class_embed`, and mask
    logits = mask_embed(queries) . mask_features.

    Args:
        in_channels: channels of the multi-scale features; a 1x1 conv projects them when it differs
            from hidden_dim (identity, no parameters, otherwise; the original needs them equal).
        hidden_dim: C, query width.
        num_queries: Q.
        nheads, dim_feedforward: attention heads and FFN width of every layer.
        num_layers: transformer layers (the original's DEC_LAYERS - 1); predictions = num_layers + 1.
        mask_dim: channels of the mask features.
        num_classes: classes without the no-object class (1 for entity segmentation).
        pre_norm: pre-norm layers instead of post-norm.
        attn_backend: backend of `cropformer.ops.masked_cross_attention`; may be reassigned later.
    """

    num_feature_levels = 3

    def __init__(
        self,
        *,
        in_channels: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 9,
        mask_dim: int = 256,
        num_classes: int = 1,
        pre_norm: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__()
        self.num_heads = nheads
        self.num_layers = num_layers
        self.attn_backend = attn_backend
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        # Registration order = the original's state-dict order.
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, normalize_before=pre_norm) for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, normalize_before=pre_norm) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, normalize_before=pre_norm) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                # detectron2's c2_xavier_fill
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def level_memory(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """Memory tokens of one level: N x C_in x h x w -> N x (h*w) x C, projected, + level_embed."""
        src = self.input_proj[level](x).flatten(2) + self.level_embed.weight[level][None, :, None]
        return src.transpose(1, 2)

    def prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor | None, attn_size=None,
                         attn_features: torch.Tensor | None = None):
        """Class logits, mask logits and the next layer's attention-mask logits.

        Args:
            output: B x Q x C query features (before `decoder_norm`).
            mask_features: B x mask_dim x H x W (one view per sample) or B x T x mask_dim x H x W
                (batch decoder: the sample's T views); None: no full-size mask logits.
            attn_size: (h, w) of the level the next layer attends to; None: no attention mask.
            attn_features: the mask features already resized to `attn_size` (same layout): the
                attention-mask logits come from them (see `decode(masks="last")`) instead of from
                resizing the full-size mask logits.
        Returns:
            class logits B x Q x (num_classes+1); mask logits B x Q x H x W (or B x Q x T x H x W) or
            None; attention-mask logits B x Q x (h*w) (or B x Q x (T*h*w), view-major), detached, or None.
        """
        decoder_output = self.decoder_norm(output)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = None if mask_features is None else _mask_logits(mask_embed, mask_features)
        B, Q = mask_embed.shape[:2]
        if attn_size is None:
            attn = None
        elif attn_features is not None:
            attn = _mask_logits(mask_embed.detach(), attn_features)
        else:
            # Each (query, view) map is resized on its own: B x Q(*T) x H x W -> B x Q(*T) x h x w.
            attn = F.interpolate(outputs_mask.detach().flatten(1, -3), size=tuple(attn_size), mode="bilinear",
                                 align_corners=False)
        return outputs_class, outputs_mask, None if attn is None else attn.reshape(B, Q, -1)

    def decode(self, queries, memories, positions, sizes, mask_features, masks: str = "all", resized=None,
               kv=None, kv_out: list | None = None):
        """The decoding loop shared by the image and the batch decoder.

        Args:
            queries: B x Q x C initial query features.
            memories: 3 tensors B x K_l x C (level l's tokens, `level_memory` layout).
            positions: 3 tensors broadcastable to B x K_l x C (key positional encodings).
            sizes: 3 (h, w), the sizes that K_l flattens (K_l = h*w, or T*h*w for the batch decoder).
            mask_features: B x mask_dim x H x W, or B x T x mask_dim x H x W.
            masks: which predictions get full-size mask logits: "all" (training: every prediction is
                supervised), "last" (inference: only the final one; the others carry None) or "none".
                With "last"/"none" the attention masks are computed from the mask features resized to
                each level: bilinear resizing is linear per channel and a mask logit is a per-pixel dot
                product, so the two orders give the same logits up to rounding, for 1/4 to 1/64 of the
                work and without the Q x H x W maps of every layer.
            resized: with "last"/"none", the mask features already resized to the 3 levels
                (`resize_features`, same layout as mask_features), when the caller has them.
            kv: optional list of num_layers (k, v), each layer's key and value projections of its level's
                memory (`CrossAttentionLayer.project_kv`); memories and positions are then unused.
            kv_out: a list to which each layer's (k, v) is appended (the batch decoder reuses them).
        Returns:
            (predictions, output): a list of num_layers + 1 (class logits, mask logits or None) pairs,
            and the final B x Q x C query features before `decoder_norm`.
        """
        if masks not in MASK_OUTPUTS:
            raise ValueError(f"masks must be one of {MASK_OUTPUTS}, got {masks!r}")
        levels = self.num_feature_levels
        # The level the layer after each prediction attends to; None after the last one.
        next_sizes = [tuple(sizes[i % levels]) for i in range(self.num_layers)] + [None]
        small = [None] * levels
        if masks != "all":
            small = resized or [resize_features(mask_features, tuple(sizes[level])) for level in range(levels)]
        query_pos = self.query_embed.weight  # Q x C, broadcast over the batch
        # Keys are memory + position, the same for the layers that share a level: added once per level
        # (and saved once for backward), not once per layer.
        keys = None if kv is not None else [_with_pos(m, p) for m, p in zip(memories, positions)]
        output, attn = queries, None
        predictions = []
        for i in range(self.num_layers + 1):
            if i > 0:
                level = (i - 1) % levels
                cross = self.transformer_cross_attention_layers[i - 1]
                layer_kv = kv[i - 1] if kv is not None else cross.project_kv(keys[level], memories[level])
                if kv_out is not None:
                    kv_out.append(layer_kv)
                output = cross(output, None, mask_logits=attn, query_pos=query_pos, backend=self.attn_backend,
                               kv=layer_kv)
                output = self.transformer_self_attention_layers[i - 1](output, query_pos=query_pos)
                output = self.transformer_ffn_layers[i - 1](output)
            full = masks == "all" or (masks == "last" and i == self.num_layers)
            if masks == "all":
                # The original's order (resize the full-size logits), kept where every mask is made anyway.
                logits, full_masks, attn = self.prediction_heads(output, mask_features, next_sizes[i])
            else:
                logits, full_masks, attn = self.prediction_heads(
                    output, mask_features if full else None, next_sizes[i],
                    None if next_sizes[i] is None else small[i % levels],
                )
            predictions.append((logits, full_masks))
        return predictions, output

    def forward(self, multi_scale_features, mask_features, masks: str = "all", resized=None,
                kv_out: list | None = None):
        """Decode every view independently.

        Args:
            multi_scale_features: 3 tensors N x C_in x h_l x w_l (strides 32, 16, 8).
            mask_features: N x mask_dim x H x W.
            masks: "all", "last" or "none": which predictions get full-size mask logits (`decode`).
            resized: optional mask features resized to the levels (`decode`).
            kv_out: optional list that receives each layer's key/value projections (`decode`).
        Returns:
            dict with pred_logits N x Q x (num_classes+1) and pred_masks N x Q x H x W (final
            prediction), aux_outputs (predictions 0 .. num_layers-1 as dicts), and query_features
            N x Q x C (final query features before `decoder_norm`, the association module's input).
        """
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(multi_scale_features)}")
        N = mask_features.shape[0]
        memories, positions, sizes = [], [], []
        for level, x in enumerate(multi_scale_features):
            sizes.append(x.shape[-2:])
            memories.append(self.level_memory(level, x))
            # The encoding is the same for every view (no padding mask): 1 x (h*w) x C.
            positions.append(self.pe_layer(x[:1]).flatten(2).transpose(1, 2).to(x.dtype))
        queries = self.query_feat.weight.unsqueeze(0).expand(N, -1, -1)
        predictions, output = self.decode(queries, memories, positions, sizes, mask_features, masks, resized,
                                          kv_out=kv_out)
        return make_output(predictions, query_features=output)


def _mask_logits(mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
    """B x Q x C embeddings . B x C x H x W (or B x T x C x H x W) features -> B x Q x H x W (B x Q x T x H x W).

    For T views the product is made view-major (B x T x Q x H x W, one matmul per view with no copy of
    the features; an einsum to B x Q x T first permuted all T views' features, 0.28 GB at 5 x 800 x 1088)
    and returned as a B x Q x T view of it: `Segmenter` reads it per view, contiguous."""
    if mask_features.dim() == 4:
        return torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
    B, T, C, H, W = mask_features.shape
    out = torch.matmul(mask_embed[:, None], mask_features.reshape(B, T, C, H * W))  # B x T x Q x HW
    return out.unflatten(-1, (H, W)).transpose(1, 2)


def resize_features(mask_features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask features (4-D or 5-D, detached) resized as `prediction_heads` resizes mask logits."""
    x = mask_features.detach()
    flat = x.flatten(0, -4)
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*x.shape[:-2], *size)


def make_output(predictions, **extra) -> dict:
    """Decoder output dict: the last prediction at top level, the earlier ones as aux_outputs."""
    out = {
        "pred_logits": predictions[-1][0],
        "pred_masks": predictions[-1][1],
        "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]],
    }
    out.update(extra)
    return out
