"""Plain builder functions: config in, modules out. Presets are the JSON files in `configs/`."""
from __future__ import annotations

from ..config import BackboneConfig, ModelConfig
from .association import AssociationModule
from .cropformer import CropFormer
from .image_decoder import ImageDecoder
from .pixel_decoder import PixelDecoder


def build_image_encoder(cfg: BackboneConfig):
    if cfg.name == "swin":
        from .backbone.swin import SwinTransformer

        s = cfg.swin
        return SwinTransformer(
            embed_dim=s.embed_dim,
            depths=tuple(s.depths),
            num_heads=tuple(s.num_heads),
            window_size=s.window_size,
            mlp_ratio=s.mlp_ratio,
            qkv_bias=s.qkv_bias,
            drop_rate=s.drop_rate,
            attn_drop_rate=s.attn_drop_rate,
            drop_path_rate=s.drop_path_rate,
            patch_size=s.patch_size,
            patch_norm=s.patch_norm,
            use_checkpoint=cfg.use_checkpoint,
        )
    if cfg.name == "hornet":
        from .backbone.hornet import HorNet

        h = cfg.hornet
        return HorNet(
            base_dim=h.base_dim,
            depths=tuple(h.depths),
            drop_path_rate=h.drop_path_rate,
            layer_scale_init_value=h.layer_scale_init_value,
            use_checkpoint=cfg.use_checkpoint,
        )
    if cfg.name == "resnet":
        from .backbone.resnet import ResNet

        r = cfg.resnet
        return ResNet(
            depth=r.depth,
            norm=r.norm,
            stem_out_channels=r.stem_out_channels,
            res2_out_channels=r.res2_out_channels,
            stride_in_1x1=r.stride_in_1x1,
        )
    raise ValueError(f"unknown backbone {cfg.name!r}")


def build_model(cfg: ModelConfig) -> CropFormer:
    """CropFormer (meta_architecture "cropformer") or the Mask2Former baseline ("mask2former")."""
    image_encoder = build_image_encoder(cfg.backbone)
    p = cfg.pixel_decoder
    pixel_decoder = PixelDecoder(
        in_channels=dict(image_encoder.out_channels),
        strides=dict(image_encoder.strides),
        conv_dim=p.conv_dim,
        mask_dim=p.mask_dim,
        num_heads=p.num_heads,
        num_points=p.num_points,
        num_layers=p.num_layers,
        ffn_dim=p.ffn_dim,
        dropout=p.dropout,
        norm=p.norm,
        common_stride=p.common_stride,
        deform_features=tuple(p.deform_features),
        fp32=p.fp32,
        msda_backend=cfg.msda_backend,
    )
    d = cfg.decoder
    if d.dec_layers < 2:
        raise ValueError(f"model.decoder.dec_layers must be >= 2 (predictions incl. the initial one), got {d.dec_layers}")
    if p.conv_dim != d.hidden_dim:
        # The original's batch decoder has no input projection (it fails to build otherwise).
        raise ValueError(
            f"model.pixel_decoder.conv_dim ({p.conv_dim}) must equal model.decoder.hidden_dim ({d.hidden_dim})"
        )
    image_decoder = ImageDecoder(
        in_channels=p.conv_dim,
        hidden_dim=d.hidden_dim,
        num_queries=d.num_queries,
        nheads=d.nheads,
        dim_feedforward=d.dim_feedforward,
        num_layers=d.dec_layers - 1,
        mask_dim=p.mask_dim,
        num_classes=cfg.num_classes,
        pre_norm=d.pre_norm,
        attn_backend=cfg.attn_backend,
    )
    association = None
    if cfg.meta_architecture == "cropformer":
        a = cfg.association
        association = AssociationModule(
            d_model=d.hidden_dim,
            nheads=a.nheads,
            dim_feedforward=a.dim_feedforward,
            num_layers=a.num_layers,
            pre_norm=a.pre_norm,
        )
    return CropFormer(
        image_encoder=image_encoder,
        pixel_decoder=pixel_decoder,
        image_decoder=image_decoder,
        association=association,
        pixel_mean=tuple(cfg.pixel_mean),
        pixel_std=tuple(cfg.pixel_std),
        size_divisibility=cfg.size_divisibility,
    )
