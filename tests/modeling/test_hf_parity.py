"""Parity with a peer implementation nobody here wrote: HuggingFace transformers'
`Mask2FormerForUniversalSegmentation` (Swin backbone), random weights copied into our Mask2Former
baseline by the checkpoint converter's name mapping (`cropformer.convert.hf_to_ours`, `HF_RENAMES`).

Compared at every stage, fp32 on CPU, to 1e-4: the four backbone outputs (res2..res5), the pixel
decoder's mask features and its three multi-scale features (strides 32, 16, 8), the class and mask
logits of every decoder prediction (the one on the learnable queries, then one per layer), and the
final query features before the decoder norm.

What is fed where, and why it is apples to apples:
- Both sides see the SAME normalised, zero-padded tensor (`CropFormer.preprocess` output: pixel
  mean/std on 0-255 RGB, then zero padding on the bottom/right to a multiple of 32, as detectron2's
  ImageList does). HF's model does not pad to 32 itself: its Swin pads only to the patch size, to
  the window size inside each block and to even sizes before patch merging, so a 250 x 330 input
  would give it 63 x 83 ... 8 x 11 maps where ours (and the original) have 64 x 88 ... 8 x 11. HF's
  image processor instead RESIZES to the next multiple of 32 (`size_divisor=32` rounds the resized
  size up) and then pads the batch with zeros after normalising; that resampling step is a
  preprocessing choice outside the network, so it is left out of the comparison. `pixel_mask` is
  accepted by HF's model but unused by its network (no padding mask anywhere, as in the original).
- HF's SwinBackbone runs with `always_partition=True`: windows are never shrunk when a map is smaller
  than the window (the classification Swin does shrink them), which is what detectron2's Swin and ours
  do; the small-input case below (stage-3 map 8 x 6 with a shifted block, stage-4 map 4 x 3) checks it.
- Semantics checked to be the same (and confirmed by the numbers): the multi-scale order (HF's
  `multi_scale_features` are the encoder outputs at strides 32, 16, 8, its input projections are
  res5, res4, res3); the level embeddings (pixel decoder: a [3, C] parameter added to the position;
  decoder: an Embedding added to the memory); sine positions normalised as (i + 1) / (n + 1e-6) * 2 pi
  without DETR's -0.5 offset; LayerNorm eps 1e-5 everywhere; exact (erf) GELU in Swin; the first
  prediction taken from `layernorm(query_features)` before layer 0; the attention mask of layer i from
  prediction i resized bilinearly (align_corners=False) to level i % 3, with fully blocked rows opened.
- The one semantic difference that cannot be removed: HF blocks a key where sigmoid(logit) < 0.5 (as
  the original does); our op blocks where logit < 0. In fp32 these differ only for
  -6e-8 < logit < 0, where sigmoid rounds to exactly 0.5; `_check_attention_masks` asserts that both
  rules give the same masks and that no resized logit comes within 1e-4 of 0, so the comparison does
  not hang on that rounding.
- HF's Swin attention runs through its default `sdpa` implementation; the numbers include it.

Everything else agrees to float rounding: max abs differences of 1e-6 to 2e-5 at every stage (listed in
`test_matches_hf_mask2former`), against the 1e-4 tolerance; transformers' own conversion test
accepts 0.3.
"""
from __future__ import annotations


import pytest
import torch
from torch.nn import functional as F

from cropformer.config import load_config
from cropformer.convert import hf_to_ours
from cropformer.modeling.build import build_model
from tests.conftest import assert_close
from tests.hf_reference import build_hf, load_hf_into_ours, randomise_

# ImportError too: an installed transformers that cannot import against this torch is also a skip.
transformers = pytest.importorskip(
    "transformers", reason="HF parity test needs `pip install transformers`", exc_type=ImportError
)

ATOL = 1e-4
RTOL = 1e-5

# The tiny Mask2Former baseline (configs/tiny.json: Swin embed 32, depths 1-1-2-1, heads 1-2-4-8, window 7,
# 64 channels, 2 encoder layers, 12 queries, 3 decoder layers). The "torch" backends are the readable
# references, so the comparison does not depend on which fast kernels this machine has.
OVERRIDES = [
    'model.meta_architecture="mask2former"',
    'model.msda_backend="torch"',
    'model.attn_backend="torch"',
]


def _build_ours():
    cfg = load_config("tiny", OVERRIDES).model
    return cfg, build_model(cfg).eval()


@torch.no_grad()
def _vary_mask_offsets_(hf) -> None:
    """Give every query a mask-logit offset of its own, so that the attention masks mix fully blocked
    rows (every key blocked: both sides must open the row), partly blocked rows and open keys.

    With plain random weights no query is blocked everywhere. Here channel 0 of the mask features
    becomes the constant 1 (1x1 conv row zeroed, bias 1), and the mask-embedding output feeding it is
    scaled x8 and shifted by -6: query q's logits get the offset 8 w.h_q - 6 at every pixel.
    """
    proj = hf.model.pixel_level_module.decoder.mask_projection
    proj.weight[0].zero_()
    proj.bias[0] = 1.0
    last = hf.model.transformer_module.decoder.mask_predictor.mask_embedder.layers[-1].layers[0]
    last.weight[0] *= 8.0
    last.bias[0] = -6.0


def _check_attention_masks(ours_logits, hf_logits, size, name: str) -> tuple[int, int]:
    """The next layer's attention mask from prediction logits B x Q x H x W, resized to `size`.

    HF blocks where sigmoid(x) < 0.5, we where x < 0: the two masks must be identical, and no resized
    logit may be within 1e-4 of 0 (about 6x the largest logit difference seen), so that a rounding
    difference cannot flip a bit on another machine. Returns (fully blocked rows, partly blocked rows).
    """
    resized = [F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False).flatten(2)
               for m in (ours_logits, hf_logits)]
    ours_block, hf_block = resized[0] < 0, resized[1].sigmoid() < 0.5
    assert torch.equal(ours_block, hf_block), f"{name}: attention masks differ at {int((ours_block != hf_block).sum())} keys"
    margin = resized[1].abs().min().item()
    assert margin > 1e-4, f"{name}: a resized mask logit is {margin:.2e} from 0; the test's seeds need changing"
    full = hf_block.all(-1)
    partial = hf_block.any(-1) & ~full
    return int(full.sum()), int(partial.sum())


# Input sizes not multiples of 32 (ours pads to 32): 180 x 230 pads to 192 x 256, so no Swin stage's map
# (48x64, 24x32, 12x16, 6x8) is a multiple of the window 7 and every block pads inside; 100 x 70 pads to
# 128 x 96, whose stage-3 map (8 x 6, holding the tiny config's one shifted block) and stage-4 map (4 x 3)
# are narrower than the window (HF with always_partition and detectron2 both pad them to multiples of 7
# and keep the shift). Batch 2 holds two different images.
@pytest.mark.parametrize("height,width,batch", [(180, 230, 2), (100, 70, 1)])
def test_matches_hf_mask2former(height, width, batch):
    """Every stage of our Mask2Former baseline against HF's, same random weights and input.

    Max abs differences measured on this machine (CPU, fp32, torch 2.14.1, transformers 5.24.0),
    180 x 230 batch 2 / 100 x 70 batch 1 (`pytest -s` prints them):
        backbone res2..res5        1.5e-6 .. 2.7e-6   /  1.2e-6 .. 2.4e-6
        mask_features              2.4e-6             /  1.8e-6
        multi-scale (32, 16, 8)    6.0e-6, 5.5e-6, 6.9e-6  /  4.8e-6, 4.5e-6, 4.1e-6
        class logits, pred 0..3    0, 1.6e-6, 8.3e-7, 9.5e-7  /  0, 8.3e-7, 6.0e-7, 8.3e-7
        mask logits, pred 0..3     1.1e-5, 1.5e-5, 1.5e-5, 1.1e-5  /  1.1e-5, 1.7e-5, 1.7e-5, 1.3e-5
        query features             1.3e-6             /  1.2e-6
    (mask logits reach |x| ~ 12-22, so their differences are ~1e-6 relative.)
    """
    torch.manual_seed(0)
    cfg, ours = _build_ours()
    hf = build_hf(cfg)
    randomise_(hf, seed=3)
    _vary_mask_offsets_(hf)
    load_hf_into_ours(hf, ours)

    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (batch, 1, 3, height, width), dtype=torch.uint8, generator=gen)

    # Lists: on CPU without autograd the backbone and pixel decoder run once per view (`CropFormer.encode`).
    calls = {"x": [], "features": [], "pixel": []}
    ours.image_encoder.register_forward_pre_hook(lambda m, args: calls["x"].append(args[0]))
    ours.image_encoder.register_forward_hook(lambda m, args, out: calls["features"].append(out))
    ours.pixel_decoder.register_forward_hook(lambda m, args, out: calls["pixel"].append(out))
    with torch.no_grad():
        out = ours(images)["image"]
        captured = {
            "x": torch.cat(calls["x"]),
            "features": {k: torch.cat([f[k] for f in calls["features"]]) for k in calls["features"][0]},
            "pixel": (torch.cat([p[0] for p in calls["pixel"]]),
                      [torch.cat(level) for level in zip(*(p[1] for p in calls["pixel"]))]),
        }
        x = captured["x"]
        assert x.shape[-2:] == (-(-height // 32) * 32, -(-width // 32) * 32)
        ref = hf(pixel_values=x, output_hidden_states=True, output_auxiliary_logits=True)

    diffs = {}

    def check(name, actual, expected):
        diffs[name] = (actual - expected).abs().max().item()
        assert_close(actual, expected, rtol=RTOL, atol=ATOL, name=name)

    features = captured["features"]
    for i, level in enumerate(("res2", "res3", "res4", "res5")):
        check(f"backbone {level}", features[level], ref.encoder_hidden_states[i])
    mask_features, multi_scale = captured["pixel"]
    check("mask_features", mask_features, ref.pixel_decoder_last_hidden_state)
    for i, stride in enumerate((32, 16, 8)):
        check(f"multi-scale stride {stride}", multi_scale[i], ref.pixel_decoder_hidden_states[i])

    ours_preds = [(a["pred_logits"], a["pred_masks"]) for a in out["aux_outputs"]]
    ours_preds.append((out["pred_logits"], out["pred_masks"]))
    hf_preds = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in ref.auxiliary_logits]
    hf_preds.append((ref.class_queries_logits, ref.masks_queries_logits))
    assert len(ours_preds) == len(hf_preds) == cfg.decoder.dec_layers
    sizes = [f.shape[-2:] for f in multi_scale]
    fully_blocked = 0
    for k, ((logits, masks), (hf_logits, hf_masks)) in enumerate(zip(ours_preds, hf_preds)):
        check(f"prediction {k} class logits", logits, hf_logits)
        check(f"prediction {k} mask logits", masks, hf_masks)
        if k < len(ours_preds) - 1:  # prediction k masks layer k's cross-attention
            full, partial = _check_attention_masks(masks, hf_masks, sizes[k % 3], f"prediction {k}")
            assert partial > 0, f"prediction {k}: no partly blocked row, masking is not exercised"
            fully_blocked += full
    assert fully_blocked > 0, "no fully blocked row: the row-opening rule is not exercised"
    check("query features (before decoder_norm)", out["query_features"], ref.transformer_decoder_last_hidden_state)

    print(f"\nmax abs differences ours vs HF transformers {transformers.__version__}, {height} x {width}, batch {batch}:")
    for name, d in diffs.items():
        print(f"  {name:40s} {d:.2e}")


def test_mapping_covers_every_parameter():
    """Every HF parameter lands on exactly one of ours with the same shape, and every one of ours is
    covered (strict load), for the full-size Swin-T Mask2Former too (built on the meta device)."""
    cfg = load_config("mask2former_swin_tiny_3x").model
    with torch.device("meta"):
        ours = build_model(cfg)
        hf = build_hf(cfg)
    state = hf_to_ours(hf.state_dict())
    ours_state = {k: v for k, v in ours.state_dict().items() if not k.endswith("relative_position_index")}
    assert sorted(state) == sorted(ours_state), (
        f"missing {sorted(set(ours_state) - set(state))[:8]}, extra {sorted(set(state) - set(ours_state))[:8]}")
    wrong = [(k, tuple(v.shape), tuple(ours_state[k].shape)) for k, v in state.items() if v.shape != ours_state[k].shape]
    assert not wrong, wrong[:8]
