"""Swin Transformer image encoder (Liu et al. 2021), as Mask2Former's `D2SwinTransformer` runs it.

Parameter and buffer names are those of the original (`patch_embed.*`, `layers.{i}.blocks.{j}.*`,
`layers.{i}.downsample.*`, `norm0..norm3`), so a CropFormer checkpoint's `backbone.*` entries load
with `strict=True` after the prefix is stripped. Behaviour kept from the original because checkpoints
were trained with it:

- every block pads its map on the bottom/right to a multiple of the window (after `norm1`, so padded
  tokens are zero vectors whose keys/values are the qkv bias); padded tokens are NOT masked out, only
  the shifted blocks get the region mask (-100 between tokens of different shift regions);
- the shift is applied at every map size (also when the map is smaller than one window);
- odd maps are padded by one row/column before patch merging; the input is padded to a multiple of
  the patch size;
- drop-path rates grow linearly over all blocks from 0 to `drop_path_rate`;
- no absolute position embedding; a LayerNorm per output level.

Internally the blocks work on B x H x W x C maps (the original flattens to B x HW x C and carries
H, W separately). Attention runs through `F.scaled_dot_product_attention` with the relative position
bias (plus the shift mask) as an additive float mask.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch import nn

# Released shapes (Swin paper Table 1); window size and drop-path rate are separate arguments.
SWIN_PRESETS = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the whole residual branch of a sample with probability p, scale the
    kept ones by 1 / (1 - p) (timm's DropPath, which the original uses). x: B x ..."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """B x H x W x C (H, W multiples of the window) -> (B * nW) x (ws * ws) x C, windows of one image
    contiguous, row-major over the window grid."""
    B, H, W, C = x.shape
    ws = window_size
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """(B * nW) x (ws * ws) x C -> B x H x W x C; inverse of `window_partition`."""
    ws = window_size
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window_size: int) -> torch.Tensor:
    """(ws*ws) x (ws*ws) int64: row of `relative_position_bias_table` for each (query, key) token pair
    of a window, (dy + ws - 1) * (2 ws - 1) + (dx + ws - 1) with d = query coords - key coords."""
    ws = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # 2 x N
    rel = coords[:, :, None] - coords[:, None, :]  # 2 x N x N
    return (rel[0] + ws - 1) * (2 * ws - 1) + (rel[1] + ws - 1)


def shifted_window_mask(Hp: int, Wp: int, window_size: int, shift: int, device=None) -> torch.Tensor:
    """nW x N x N float32 additive mask for the cyclically shifted windows of an Hp x Wp map.

    Rows/columns are split into three regions ([0, n - ws), [n - ws, n - shift), [n - shift, n)) as
    in the original; two tokens of one window in different regions (3 x 3 combinations) get -100,
    others 0. The padded area is not masked (as in the original).
    """

    def regions(n: int) -> torch.Tensor:
        ids = torch.zeros(n, dtype=torch.float32, device=device)
        ids[n - window_size : n - shift] = 1
        ids[n - shift :] = 2
        return ids

    img = (regions(Hp)[:, None] * 3 + regions(Wp)[None, :])[None, :, :, None]  # 1 x Hp x Wp x 1
    win = window_partition(img, window_size).squeeze(-1)  # nW x N
    diff = win[:, None, :] - win[:, :, None]  # nW x N x N
    return torch.zeros_like(diff).masked_fill_(diff != 0, -100.0)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws x ws windows with a learned relative position bias.

    Args:
        dim: channels C. window_size: ws. num_heads: h (C divisible by h).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """h x N x N additive bias, N = ws * ws."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B * nW) x N x C windows, those of one image contiguous.
            mask: nW x N x N additive shift mask (0 / -100) or None.
        Returns:
            (B * nW) x N x C.
        """
        Bw, N, C = x.shape
        h = self.num_heads
        nW = 1 if mask is None else mask.shape[0]
        B = Bw // nW
        # (window, head) pairs of one image share a batch row so that the per-window mask broadcasts
        # over images: 3 x B x (nW * h) x N x d.
        qkv = self.qkv(x).reshape(B, nW, N, 3, h, C // h).permute(3, 0, 1, 4, 2, 5).reshape(3, B, nW * h, N, C // h)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias()  # h x N x N
        if mask is not None:
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # nW x h x N x N
        # 4-D: with a 3-D mask torch's CPU SDPA takes its unfused math path (4-5x slower here)
        bias = bias.reshape(1, nW * h, N, N).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )  # B x (nW * h) x N x d
        # An explicit copy, not reshape: the fused kernel's output layout lets reshape trace as a view,
        # which the math kernel's layout (ONNX export decomposes SDPA to it) cannot satisfy.
        out = out.view(B, nW, h, N, C // h).transpose(2, 3).clone(memory_format=torch.contiguous_format).view(Bw, N, C)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention + MLP, pre-norm, each with a residual."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size {window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x: B x H x W x C; attn_mask: shift mask of the padded map (used when shift_size > 0)."""
        B, H, W, C = x.shape
        ws, s = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x)
        x = F.pad(x, (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
        Hp, Wp = x.shape[1:3]
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = self.attn(window_partition(x, ws), attn_mask if s > 0 else None)
        x = window_reverse(x, ws, Hp, Wp)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = shortcut + self.drop_path(x[:, :H, :W])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2 x 2 neighbourhood concat (pads odd maps) -> LayerNorm(4C) -> Linear(4C, 2C, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x H x W x C -> B x ceil(H/2) x ceil(W/2) x 2C."""
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # channel order (even row, even col), (odd, even), (even, odd), (odd, odd) as in the original
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating plain / shifted windows, then optional patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_path: Sequence[float],
                 downsample: bool, use_checkpoint: bool):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                                 mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x H x W x C -> (stage output B x H x W x C, input of the next stage)."""
        H, W = x.shape[1:3]
        ws = self.window_size
        mask = None
        if len(self.blocks) > 1:
            Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
            mask = shifted_window_mask(Hp, Wp, ws, self.shift_size, x.device)
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size conv (input padded to a multiple), optional LayerNorm."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x ceil(H/p) x ceil(W/p) x C."""
        p = self.patch_size
        H, W = x.shape[2:]
        x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class SwinTransformer(nn.Module):
    """Swin image encoder returning res2..res5.

    Args:
        embed_dim: channels of the first stage (C_i = embed_dim * 2**i).
        depths, num_heads: blocks and heads per stage (see `SWIN_PRESETS`).
        window_size: 7 (all released CropFormer configs) or 12.
        drop_path_rate: last block's rate; block k of K gets drop_path_rate * k / (K - 1).
        use_checkpoint: recompute each block in backward (activation checkpointing).
    Forward:
        x: N x 3 x H x W normalised images (multiples of 32 expected; other sizes run, as upstream).
        returns {"res2".."res5": N x C_i x ceil(H / s_i) x ceil(W / s_i)}, s_i = 4, 8, 16, 32.
    """

    def __init__(self, *, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.3, patch_size: int = 4, patch_norm: bool = True,
                 use_checkpoint: bool = False, in_chans: int = 3):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError("SwinTransformer needs 4 stages (res2..res5)")
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.layers.append(
                BasicLayer(embed_dim * 2**i, depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias,
                           drop_rate, attn_drop_rate, dpr[start : start + depths[i]],
                           downsample=i < 3, use_checkpoint=use_checkpoint)
            )
        self.num_features = [embed_dim * 2**i for i in range(4)]
        for i in range(4):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.out_channels = {f"res{i + 2}": c for i, c in enumerate(self.num_features)}
        self.strides = {f"res{i + 2}": patch_size * 2**i for i in range(4)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer takes N x C x H x W input, got shape {tuple(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))  # N x H/4 x W/4 x C
        outs = {}
        for i, layer in enumerate(self.layers):
            out, x = layer(x)
            outs[f"res{i + 2}"] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous()
        return outs
