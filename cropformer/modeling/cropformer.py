"""The two meta-architectures: CropFormer (T views through image decoder, association module and batch
decoder) and the Mask2Former entity baseline (one view, image decoder only).

The top model receives built submodules (segment-anything style); `cropformer.modeling.build` makes
them from a config.
"""
from __future__ import annotations

import torch
from torch import nn

from .batch_decoder import BatchDecoder
from .image_decoder import resize_features


class CropFormer(nn.Module):
    """Image encoder -> pixel decoder -> image decoder (per view) [-> association -> batch decoder].

    Args:
        image_encoder: backbone returning res2..res5; has `.out_channels` and `.strides`.
        pixel_decoder: returns (mask_features, [stride 32, 16, 8] features).
        image_decoder: masked-attention decoder, run on every view independently.
        association: association module, or None for the Mask2Former baseline (no batch decoder).
        pixel_mean, pixel_std: RGB normalisation on 0-255 values.
        size_divisibility: inputs are padded to a multiple of this (the backbone's largest stride).
    """

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        pixel_decoder: nn.Module,
        image_decoder: nn.Module,
        association: nn.Module | None,
        pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375),
        size_divisibility: int = 32,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.pixel_decoder = pixel_decoder
        self.image_decoder = image_decoder
        self.association = association
        # Same weights as the image decoder; holds no parameters of its own.
        self.batch_decoder = BatchDecoder(image_decoder) if association is not None else None
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The network's compute dtype: float32, or bfloat16 for a model cast whole (fast mode)."""
        return self.pixel_decoder.mask_features.weight.dtype

    @property
    def is_cropformer(self) -> bool:
        return self.association is not None

    def preprocess(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """B x T x 3 x H x W (uint8 or float, RGB 0-255) -> (B*T) x 3 x Hp x Wp normalised, zero padded.

        Padding is zero AFTER normalisation, as the original's ImageList.from_tensors does; pixels outside
        each view's `image_sizes` (B x T x 2, rows/cols) are zeroed too.
        """
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be B x T x 3 x H x W, got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"images must be uint8 or floating point RGB 0-255, got {images.dtype}")
        B, T, _, H, W = images.shape
        stride = self.size_divisibility
        if H < stride or W < stride:
            raise ValueError(f"image of {H}x{W} is smaller than the model's stride {stride}; resize it first")
        Hp, Wp = -(-H // stride) * stride, -(-W // stride) * stride
        x = images.reshape(B * T, 3, H, W).to(self.pixel_mean.device, torch.float32)
        x = (x - self.pixel_mean) / self.pixel_std
        if image_sizes is not None:
            # a comparison, not a loop over the sizes read back to the host: traceable for torch.compile/export
            sizes = image_sizes.reshape(B * T, 2, 1, 1).to(x.device)
            rows = torch.arange(H, device=x.device).view(1, H, 1) < sizes[:, 0]  # (B*T) x H x 1
            cols = torch.arange(W, device=x.device).view(1, 1, W) < sizes[:, 1]  # (B*T) x 1 x W
            x = x * (rows & cols)[:, None]
        if (Hp, Wp) != (H, W):
            x = nn.functional.pad(x, (0, Wp - W, 0, Hp - H))
        return x.to(self.dtype)  # normalised in float32, then the network's dtype

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Backbone + pixel decoder over N preprocessed views: (mask_features, multi-scale features).

        On CPU without autograd the views go through one at a time: one view's working set stays in
        the caches, and five views of 800 x 1088 took 16.8-18.5 s this way against 19.6-20.2 s as one
        batch (9-15% less; 512 x 512: 14%; 256 x 320: 6-10%; Swin-T, 2 threads). The norms are
        per-sample (LayerNorm, GroupNorm; BatchNorm in eval mode only), so the outputs are the
        same up to rounding. GPUs, training and traced graphs keep the batch.
        """
        per_view = (x.device.type == "cpu" and x.shape[0] > 1 and not self.training and not torch.is_grad_enabled()
                    and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())
        if not per_view:
            return self.pixel_decoder(self.image_encoder(x))
        outs = [self.pixel_decoder(self.image_encoder(view)) for view in x.split(1)]
        mask_features = torch.cat([o[0] for o in outs])
        return mask_features, [torch.cat(level) for level in zip(*(o[1] for o in outs))]

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None, run_batch_decoder: bool = True,
                masks: str = "all") -> dict:
        """Run every view through the network.

        Args:
            images: B x T x 3 x H x W RGB 0-255 (T = 1 for the Mask2Former baseline).
            image_sizes: B x T x 2 valid size of each view (padding zeroed after normalisation).
            run_batch_decoder: CropFormer only; False skips association + batch decoder.
            masks: "all" (default; training, and every prediction for inspection) or "last": full-size
                mask logits only for the final prediction of the decoder whose output is used (the batch
                decoder when it runs, else the image decoder); every other "pred_masks" is None. Same
                final outputs up to rounding, far less work: what `Segmenter` runs.

        Returns a dict with
            "image": image-decoder outputs over the B*T views (pred_logits (B*T) x Q x 2,
                     pred_masks (B*T) x Q x H/4 x W/4, aux_outputs, query_features)
            "batch": (CropFormer) batch-decoder outputs (pred_logits B x Q x 2,
                     pred_masks B x Q x T x H/4 x W/4, aux_outputs), and "association": B x Q x C.
        """
        B, T = images.shape[:2]
        x = self.preprocess(images, image_sizes)
        mask_features, multi_scale = self.encode(x)
        batch = self.is_cropformer and run_batch_decoder
        if masks not in ("all", "last"):
            raise ValueError(f"masks must be 'all' or 'last', got {masks!r}")
        resized = None
        if masks == "last":  # resized once for both decoders (the batch decoder sees the same maps per view)
            resized = [resize_features(mask_features, tuple(f.shape[-2:])) for f in multi_scale]
        # The batch decoder reuses the image decoder's key/value projections of the same views (see
        # BatchDecoder.forward): held until it runs, about 0.55 GB for five 800 x 1088 views of Swin-T.
        image_kv = [] if batch else None
        image_out = self.image_decoder(multi_scale, mask_features, "none" if batch and masks == "last" else masks,
                                       resized, kv_out=image_kv)
        out = {"image": image_out}
        if batch:
            query_features = image_out["query_features"].reshape(B, T, *image_out["query_features"].shape[1:])
            init_queries = self.association(query_features, self.image_decoder.query_embed.weight)
            out["association"] = init_queries
            out["batch"] = self.batch_decoder(multi_scale, mask_features, init_queries, T, masks, resized, image_kv)
        return out
