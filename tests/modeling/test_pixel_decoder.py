"""Pixel decoder (MSDeformAttn encoder + FPN) and the sine position encoding.

The golden tests compare against outputs recorded from the original CropFormer code
(`shared/reference/golden_tiny`, see its README); they skip when the reference folder is absent.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from cropformer.modeling.pixel_decoder import PixelDecoder
from cropformer.modeling.position_encoding import PositionEmbeddingSine
from tests.conftest import assert_close, load_reference, reference_dir

PREFIX = "sem_seg_head.pixel_decoder."
LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
TINY_CHANNELS = {"res2": 32, "res3": 64, "res4": 128, "res5": 256}


def tiny_decoder(**kwargs) -> PixelDecoder:
    """The golden tiny config: CONVS_DIM = MASK_DIM = 64, NHEADS 4, 2 encoder layers, FFN 1024."""
    args = dict(in_channels=TINY_CHANNELS, strides=STRIDES, conv_dim=64, mask_dim=64, num_heads=4,
                num_points=4, num_layers=2, ffn_dim=1024)
    args.update(kwargs)
    return PixelDecoder(**args)


def golden_state_dict() -> dict[str, torch.Tensor]:
    path = reference_dir("golden_tiny") / "tiny_state_dict.safetensors"
    return {k[len(PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(PREFIX)}


def random_features(batch: int, height: int, width: int, channels=TINY_CHANNELS, dtype=torch.float32):
    return {k: torch.randn(batch, channels[k], height // STRIDES[k], width // STRIDES[k], dtype=dtype)
            for k in LEVELS}


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_golden_tiny_outputs(backend):
    model = tiny_decoder(msda_backend=backend).eval()
    model.load_state_dict(golden_state_dict(), strict=True)
    out = load_reference("golden_tiny", "outputs.pt")
    features = {k: out[f"train.backbone.{k}"] for k in LEVELS}  # 2 views, padded input 128 x 192

    with torch.no_grad():
        mask_features, multi_scale = model(features)

    assert_close(mask_features, out["train.pixel_decoder.mask_features"], rtol=1e-4, atol=1e-4,
                 name="mask_features")
    assert len(multi_scale) == 3
    for i, feat in enumerate(multi_scale):
        assert_close(feat, out[f"train.pixel_decoder.multi_scale_features.{i}"], rtol=1e-4, atol=1e-4,
                     name=f"multi_scale_features.{i}")


def test_init_matches_original_tiny():
    """Fresh init vs the original's fresh init (the golden weights were never trained): parameters
    that are constant at init must be identical, random ones must have the same spread."""
    golden = golden_state_dict()
    torch.manual_seed(0)
    ours = tiny_decoder().state_dict()
    assert sorted(ours) == sorted(golden)  # safetensors stores keys sorted
    constant = ("sampling_offsets", "attention_weights", ".bias", ".norm", "norm1", "norm2", "input_proj.0.1",
                "input_proj.1.1", "input_proj.2.1")
    random_init = ("linear1.bias", "linear2.bias")  # nn.Linear's default uniform bias, kept by the original
    for name, g in golden.items():
        o = ours[name]
        if any(c in name for c in constant) and not name.endswith(random_init):
            assert torch.equal(o, g), f"{name}: constant init differs"
        else:
            # Weight spreads: xavier (input_proj, encoder matrices), c2_xavier_fill = kaiming_uniform(a=1)
            # (adapter, layer, mask_features), normal (level_embed), nn.Linear default (FFN biases).
            ratio = (o.float().std() / g.float().std()).item()
            low, high = (0.85, 1.18) if g.numel() >= 1000 else (0.6, 1.67)
            assert low < ratio < high, f"{name}: std ratio ours / original = {ratio:.3f}"


def test_swin_tiny_keys_and_shapes():
    path = reference_dir("keys") / "cropformer_swin_tiny_3x.txt"
    expected = []
    for line in path.read_text().splitlines():
        if line.startswith(PREFIX):
            name, shape, _ = line.split("\t")
            expected.append((name[len(PREFIX):], tuple(int(s) for s in shape.split(","))))
    model = PixelDecoder(in_channels={"res2": 96, "res3": 192, "res4": 384, "res5": 768}, strides=STRIDES)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == expected


def test_more_fpn_levels_when_encoder_skips_res3():
    """Deformable encoder on res4/res5 only: two FPN steps (res3, then res2), named adapter_1 (res2)
    and adapter_2 (res3) as the original numbers them, and the third scale is the res3 FPN output."""
    model = tiny_decoder(deform_features=("res4", "res5"))
    assert model.adapter_1.weight.shape[1] == TINY_CHANNELS["res2"]
    assert model.adapter_2.weight.shape[1] == TINY_CHANNELS["res3"]
    with torch.no_grad():
        mask_features, multi_scale = model(random_features(1, 64, 96))
    assert mask_features.shape == (1, 64, 16, 24)
    assert [tuple(f.shape[-2:]) for f in multi_scale] == [(2, 3), (4, 6), (8, 12)]


def test_forward_backward_non_square():
    torch.manual_seed(1)
    model = tiny_decoder()
    # At init the offset and attention-weight projections are zero, so the query (and with it the
    # level embedding) has no path to the output yet; perturb them as a trained model would have.
    with torch.no_grad():
        for layer in model.transformer.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.05)
            layer.self_attn.attention_weights.weight.normal_(std=0.05)
    # 96 x 160 input: every level is non-square (res5 is 3 x 5)
    features = random_features(2, 96, 160)
    mask_features, multi_scale = model(features)
    assert mask_features.shape == (2, 64, 24, 40)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 64, 3, 5), (2, 64, 6, 10), (2, 64, 12, 20)]

    # Random weights: a plain sum of GroupNorm/LayerNorm outputs would have near-zero gradients.
    loss = (mask_features * torch.randn_like(mask_features)).sum()
    loss = loss + sum((f * torch.randn_like(f)).sum() for f in multi_scale)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


def test_fp32_under_autocast():
    torch.manual_seed(2)
    model = tiny_decoder(fp32=True).eval()
    features = random_features(1, 64, 96)
    with torch.no_grad():
        ref_mask, ref_scales = model(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mask, scales = model(features)
            # bf16 backbone features are upcast, not rejected
            mask_lp, _ = model({k: v.bfloat16() for k, v in features.items()})
    assert mask.dtype == torch.float32 and all(s.dtype == torch.float32 for s in scales)
    assert torch.equal(mask, ref_mask)
    for s, r in zip(scales, ref_scales):
        assert torch.equal(s, r)
    assert mask_lp.dtype == torch.float32

    # Without fp32 the same call really runs under autocast (so the check above can fail).
    model.fp32 = False
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mask_bf16, _ = model(features)
    assert mask_bf16.dtype == torch.bfloat16
    assert_close(mask_bf16.float(), ref_mask, rtol=0.1, atol=0.1, name="bf16 mask_features")


def sine_formula(h: int, w: int, feats: int, temperature=10000.0, scale=2 * math.pi) -> torch.Tensor:
    """Element by element in float64: 2F x h x w for an unpadded h x w map (normalize=True)."""
    out = torch.empty(2 * feats, h, w, dtype=torch.float64)
    for c in range(feats):
        freq = temperature ** (2 * (c // 2) / feats)
        fn = math.sin if c % 2 == 0 else math.cos
        for i in range(h):
            for j in range(w):
                y = (i + 1) / (h + 1e-6) * scale
                x = (j + 1) / (w + 1e-6) * scale
                out[c, i, j] = fn(y / freq)
                out[feats + c, i, j] = fn(x / freq)
    return out


def test_position_encoding_formula():
    pe = PositionEmbeddingSine(num_pos_feats=6, normalize=True)
    pos = pe(torch.zeros(2, 5, 3, 7))  # odd, non-square map; channels of x are ignored
    assert pos.shape == (2, 12, 3, 7) and pos.dtype == torch.float32
    expected = sine_formula(3, 7, 6)
    for b in range(2):
        assert_close(pos[b], expected, rtol=1e-5, atol=1e-5, name=f"pos[{b}]")


def test_position_encoding_padding_mask():
    """With a padding mask the valid region is encoded as if it were the whole map."""
    pe = PositionEmbeddingSine(num_pos_feats=4, normalize=True)
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[1, 3:, :] = True  # image 1 is 3 x 4 inside the padded 5 x 6
    mask[1, :, 4:] = True
    pos = pe(torch.zeros(2, 1, 5, 6), mask)
    assert_close(pos[0], sine_formula(5, 6, 4), rtol=1e-5, atol=1e-5, name="unpadded image")
    assert_close(pos[1, :, :3, :4], sine_formula(3, 4, 4), rtol=1e-5, atol=1e-5, name="padded image")
