"""Image decoder, association module and batch decoder.

The golden tests compare against every decoder intermediate recorded from the original CropFormer code
(`shared/reference/golden_tiny`, see its README: tiny config, random weights, CPU); they skip when the
reference folder is absent. The other tests use random weights and odd sizes.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cropformer.convert import rename_key
from cropformer.modeling.association import AssociationModule
from cropformer.modeling.batch_decoder import BatchDecoder, view_position_encoding
from cropformer.modeling.image_decoder import CrossAttentionLayer, FFNLayer, ImageDecoder, SelfAttentionLayer
from tests.conftest import assert_close, cuda_or_skip, load_reference, reference_dir, triton_device_or_skip

# Golden tiny config: HIDDEN_DIM = CONVS_DIM = MASK_DIM 64, 12 queries, 4 heads, FFN 128, DEC_LAYERS 4
# (3 transformer layers); association: 8 heads, FFN 2048 (the original's FUSE_ENC_* defaults).
TINY = dict(in_channels=64, hidden_dim=64, num_queries=12, nheads=4, dim_feedforward=128, num_layers=3, mask_dim=64)
TINY_ASSOC = dict(d_model=64, nheads=8, dim_feedforward=2048)
GOLDEN_TOL = dict(rtol=1e-4, atol=1e-4)


class DecoderHeads(torch.nn.Module):
    """Image decoder + association + batch decoder as the full model holds them (parameters once)."""

    def __init__(self, image_decoder, association):
        super().__init__()
        self.image_decoder = image_decoder
        self.association = association
        self.batch_decoder = BatchDecoder(image_decoder)

    def forward(self, multi_scale_features, mask_features, num_views):
        image_out = self.image_decoder(multi_scale_features, mask_features)
        qf = image_out["query_features"]
        qf = qf.reshape(-1, num_views, *qf.shape[1:])  # B x T x Q x C
        init = self.association(qf, self.image_decoder.query_embed.weight)
        batch_out = self.batch_decoder(multi_scale_features, mask_features, init, num_views)
        return image_out, init, batch_out


def predictions(out: dict):
    """All predictions of a decoder output, first to last: list of (logits, masks)."""
    return [(a["pred_logits"], a["pred_masks"]) for a in out["aux_outputs"]] + [(out["pred_logits"], out["pred_masks"])]


@pytest.fixture(scope="module")
def golden():
    """(image decoder, association module) with the golden weights, and outputs.pt."""
    path = reference_dir("golden_tiny") / "tiny_state_dict.safetensors"
    decoder_sd, assoc_sd = {}, {}
    for key, value in load_file(str(path)).items():
        ours = rename_key(key)  # the checkpoint conversion table, cropformer/convert.py
        if ours is None:
            continue
        if ours.startswith("image_decoder."):
            decoder_sd[ours[len("image_decoder."):]] = value
        elif ours.startswith("association."):
            assoc_sd[ours[len("association."):]] = value
    decoder = ImageDecoder(**TINY).eval()
    decoder.load_state_dict(decoder_sd, strict=True)
    association = AssociationModule(**TINY_ASSOC).eval()
    association.load_state_dict(assoc_sd, strict=True)
    return decoder, association, load_reference("golden_tiny", "outputs.pt")


def golden_features(out, run="train"):
    ms = [out[f"{run}.pixel_decoder.multi_scale_features.{i}"] for i in range(3)]
    return ms, out[f"{run}.pixel_decoder.mask_features"]


def test_image_decoder_golden(golden):
    """(a) 2 views (full image, crop): logits and mask logits of all 4 predictions."""
    decoder, _, out = golden
    ms, mf = golden_features(out)
    with torch.no_grad():
        result = decoder(ms, mf)
    preds = predictions(result)
    assert len(preds) == TINY["num_layers"] + 1
    for i, (logits, masks) in enumerate(preds):
        assert_close(logits, out["train.decoder_2d.pred_logits"][i], **GOLDEN_TOL, name=f"decoder_2d logits[{i}]")
        assert_close(masks, out["train.decoder_2d.pred_masks"][i], **GOLDEN_TOL, name=f"decoder_2d masks[{i}]")
    assert result["query_features"].shape == (2, 12, 64)


def test_association_golden(golden):
    """(b) make_3d output, recorded as Q x B x C."""
    decoder, association, out = golden
    ms, mf = golden_features(out)
    with torch.no_grad():
        qf = decoder(ms, mf)["query_features"].reshape(1, 2, 12, 64)
        init = association(qf, decoder.query_embed.weight)
    assert_close(init, out["train.make_3d_output"].transpose(0, 1), **GOLDEN_TOL, name="make_3d_output")


def test_batch_decoder_golden(golden):
    """(c) batch decoder over the 2 views, from the recorded association output: all 4 predictions."""
    decoder, _, out = golden
    ms, mf = golden_features(out)
    init = out["train.make_3d_output"].transpose(0, 1)  # B x Q x C
    with torch.no_grad():
        result = BatchDecoder(decoder)(ms, mf, init, num_views=2)
    preds = predictions(result)
    assert len(preds) == TINY["num_layers"] + 1
    for i, (logits, masks) in enumerate(preds):
        assert_close(logits, out["train.decoder_3d.pred_logits"][i], **GOLDEN_TOL, name=f"decoder_3d logits[{i}]")
        assert_close(masks, out["train.decoder_3d.pred_masks"][i], **GOLDEN_TOL, name=f"decoder_3d masks[{i}]")


def test_chain_golden(golden):
    """(a)+(b)+(c) chained as the model runs them: the association input comes from our image decoder."""
    decoder, association, out = golden
    ms, mf = golden_features(out)
    with torch.no_grad():
        _, init, batch_out = DecoderHeads(decoder, association)(ms, mf, num_views=2)
    assert_close(init, out["train.make_3d_output"].transpose(0, 1), **GOLDEN_TOL, name="make_3d_output")
    assert_close(batch_out["pred_masks"], out["train.decoder_3d.pred_masks"][-1], **GOLDEN_TOL, name="final masks")


def test_inference_run_golden_first_prediction(golden):
    """(c, inference run) Only prediction 0's class logits can be checked: the inference pixel-decoder
    outputs were not recorded, and prediction 0's logits are the only recorded values that do not depend
    on them (image decoder: from query_feat; batch decoder: from the recorded association output).
    Random features of the recorded shapes (5 views, padded 160 x 224) stand in for the missing ones.
    """
    decoder, _, out = golden
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(5, 64, h, w, generator=g) for h, w in ((5, 7), (10, 14), (20, 28))]
    mf = torch.randn(5, 64, 40, 56, generator=g)
    init = out["infer.make_3d_output"].transpose(0, 1)  # 1 x Q x C
    with torch.no_grad():
        image_out = decoder(ms, mf)
        batch_out = BatchDecoder(decoder)(ms, mf, init, num_views=5)
    assert_close(image_out["aux_outputs"][0]["pred_logits"], out["infer.decoder_2d.pred_logits"][0], **GOLDEN_TOL,
                 name="infer decoder_2d logits[0]")
    assert_close(batch_out["aux_outputs"][0]["pred_logits"], out["infer.decoder_3d.pred_logits"][0], **GOLDEN_TOL,
                 name="infer decoder_3d logits[0]")
    assert batch_out["pred_masks"].shape == out["infer.decoder_3d.pred_masks_last"].shape


def test_view_position_encoding_values():
    """Channel c of view t: sin/cos((t+1)/(T+1e-6)*2pi / 10000**(2*(c//2)/C)), sin on even channels."""
    pe = view_position_encoding(3, 6).double()
    t = torch.arange(1, 4, dtype=torch.float64)[:, None] / (3 + 1e-6) * 2 * torch.pi
    c = torch.arange(6)
    arg = t / 10000 ** (2 * (c // 2) / 6).double()
    expected = torch.where(c % 2 == 0, arg.sin(), arg.cos())
    assert_close(pe, expected, rtol=1e-6, atol=1e-6, name="view position encoding")


def random_inputs(num_samples, num_views, channels=64, seed=0):
    """Odd level sizes (3x5, 5x9, 9x17; masks 17x33) so no h/w or view/level mix-up can go unseen."""
    g = torch.Generator().manual_seed(seed)
    n = num_samples * num_views
    ms = [torch.randn(n, channels, h, w, generator=g) for h, w in ((3, 5), (5, 9), (9, 17))]
    return ms, torch.randn(n, TINY["mask_dim"], 17, 33, generator=g)


def tiny_heads(seed=0, **kwargs):
    torch.manual_seed(seed)
    return DecoderHeads(ImageDecoder(**{**TINY, **kwargs}), AssociationModule(**TINY_ASSOC))


def test_batch_samples_independent():
    """B = 2 samples (sample-major, view-minor) give what each sample gives alone: no mixing across the
    batch in the memory layout, the association or the mask einsum."""
    heads = tiny_heads().eval()
    ms, mf = random_inputs(2, 3)
    with torch.no_grad():
        image_out, init, batch_out = heads(ms, mf, num_views=3)
        for b in range(2):
            sl = slice(3 * b, 3 * b + 3)
            single_image, single_init, single_batch = heads([x[sl] for x in ms], mf[sl], num_views=3)
            assert_close(init[b], single_init[0], name=f"association sample {b}")
            assert_close(image_out["pred_masks"][sl], single_image["pred_masks"], name=f"image masks sample {b}")
            for (lb, mb), (ls, ms_) in zip(predictions(batch_out), predictions(single_batch)):
                assert_close(lb[b], ls[0], name=f"batch logits sample {b}")
                assert_close(mb[b], ms_[0], name=f"batch masks sample {b}")
    assert batch_out["pred_masks"].shape == (2, 12, 3, 17, 33)
    assert batch_out["pred_logits"].shape == (2, 12, 2)
    assert len(batch_out["aux_outputs"]) == TINY["num_layers"]


def test_gradients_reach_every_parameter():
    """(d) One forward/backward through image decoder + association + batch decoder."""
    heads = tiny_heads().train()
    ms, mf = random_inputs(2, 2)
    image_out, _, batch_out = heads(ms, mf, num_views=2)
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g)).sum()
               for out in (image_out, batch_out) for pair in predictions(out) for t in pair)
    loss.backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"

    # Parameters are counted once: the batch decoder owns none and adds no state-dict keys.
    assert list(heads.batch_decoder.parameters()) == []
    assert not any(k.startswith("batch_decoder.") for k in heads.state_dict())
    count = sum(p.numel() for p in heads.parameters())
    assert count == sum(p.numel() for p in heads.image_decoder.parameters()) + sum(
        p.numel() for p in heads.association.parameters())

    # The batch-level loss alone reaches the image decoder's queries through the association module.
    heads.zero_grad()
    image_out, _, batch_out = heads(ms, mf, num_views=2)
    sum(t.square().mean() for pair in predictions(batch_out) for t in pair).backward()
    assert heads.image_decoder.query_feat.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.association.parameters())


def test_keys_match_original_swin_tiny():
    """(e) Swin-T sized decoder + association: names (via cropformer/convert.py) and shapes equal the
    original's `sem_seg_head.predictor.*` entries, in state-dict order."""
    path = reference_dir("keys") / "cropformer_swin_tiny_3x.txt"
    expected = {}
    for line in path.read_text().splitlines():
        if line.startswith("sem_seg_head.predictor."):
            name, shape, _ = line.split("\t")
            expected[name] = tuple(int(s) for s in shape.split(","))
    with torch.device("meta"):  # shapes only, no init cost
        decoder = ImageDecoder(in_channels=256, hidden_dim=256, num_queries=100, nheads=8, dim_feedforward=2048,
                               num_layers=9, mask_dim=256, num_classes=1)
        association = AssociationModule(d_model=256, nheads=8, dim_feedforward=2048, num_layers=1)
    # Our name -> original name, most specific prefix first (the inverse of the conversion table).
    inverse = (("association.cross_attention_layers.", "sem_seg_head.predictor.make_3d.enc_crosattn_3d."),
               ("association.self_attention_layers.", "sem_seg_head.predictor.make_3d.enc_selfattn_3d."),
               ("association.ffn_layers.", "sem_seg_head.predictor.make_3d.enc_ffn_3d."),
               ("image_decoder.", "sem_seg_head.predictor."))
    ours = {}
    for prefix, module in (("image_decoder.", decoder), ("association.", association)):
        for key, value in module.state_dict().items():
            full = prefix + key
            original = next(old + full[len(new):] for new, old in inverse if full.startswith(new))
            assert rename_key(original) == full, f"{original} does not convert back to {full}"
            ours[original] = tuple(value.shape)
    assert ours == expected
    assert [k for k in ours if ".make_3d." not in k] == [k for k in expected if ".make_3d." not in k]


def test_input_projection_when_channels_differ():
    """in_channels != hidden_dim adds 1x1 convs named input_proj.{0,1,2} (absent when equal)."""
    decoder = ImageDecoder(**{**TINY, "in_channels": 48})
    assert {k for k in decoder.state_dict() if k.startswith("input_proj.")} == {
        f"input_proj.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert not any(k.startswith("input_proj.") for k in ImageDecoder(**TINY).state_dict())
    ms, mf = random_inputs(1, 2, channels=48)
    out = decoder(ms, mf)
    assert out["pred_masks"].shape == (2, 12, 17, 33)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_cross_attention_layer_matches_multihead_attention(pre_norm):
    """Our cross-attention (in_proj weights + masked_cross_attention op) equals nn.MultiheadAttention's
    own forward with the original's boolean mask (sigmoid < 0.5 blocks, fully blocked rows opened),
    post- and pre-norm."""
    torch.manual_seed(0)
    layer = CrossAttentionLayer(64, 4, normalize_before=pre_norm).double()
    B, Q, K = 2, 7, 45
    tgt, qpos = torch.randn(B, Q, 64).double(), torch.randn(Q, 64).double()
    memory, pos = torch.randn(B, K, 64).double(), torch.randn(1, K, 64).double()
    logits = torch.randn(B, Q, K).double()
    logits[0, 3] = -1.0  # a fully blocked row: must attend everywhere
    ours = layer(tgt, memory, mask_logits=logits, pos=pos, query_pos=qpos, backend="torch")

    blocked = logits.sigmoid() < 0.5
    blocked[blocked.all(-1)] = False
    attn_mask = blocked.repeat_interleave(4, dim=0)  # (B*heads) x Q x K, as the original repeats it
    x = layer.norm(tgt) if pre_norm else tgt
    ref = tgt + layer.multihead_attn(x + qpos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
    ref = ref if pre_norm else layer.norm(ref)
    assert_close(ours, ref, rtol=1e-10, atol=1e-10, name="cross-attention layer")


@pytest.mark.parametrize("pre_norm", [False, True])
def test_self_attention_and_ffn_layers(pre_norm):
    """Post-norm: norm(x + f(x)); pre-norm: x + f(norm(x)); the position goes into q and k only."""
    torch.manual_seed(0)
    sa = SelfAttentionLayer(64, 4, normalize_before=pre_norm).double()
    ffn = FFNLayer(64, 96, normalize_before=pre_norm).double()
    x, qpos = torch.randn(2, 7, 64).double(), torch.randn(7, 64).double()
    y = sa.norm(x) if pre_norm else x
    ref = x + sa.self_attn(y + qpos, y + qpos, y, need_weights=False)[0]
    assert_close(sa(x, query_pos=qpos), ref if pre_norm else sa.norm(ref), rtol=1e-10, atol=1e-10, name="self-attn")
    y = ffn.norm(x) if pre_norm else x
    ref = x + ffn.linear2(torch.relu(ffn.linear1(y)))
    assert_close(ffn(x), ref if pre_norm else ffn.norm(ref), rtol=1e-10, atol=1e-10, name="ffn")


def test_layer_init_is_xavier_uniform():
    """As the original's layers re-initialise themselves: every parameter with dim > 1 inside the
    attention/FFN layers is xavier-uniform (bound sqrt(6 / (fan_in + fan_out)), which is larger than
    PyTorch's default Linear bound 1/sqrt(fan_in) for these shapes, so the maximum tells them apart);
    attention biases stay zero; embeddings and heads keep PyTorch's defaults."""
    torch.manual_seed(0)
    heads = tiny_heads()
    layers = [m for m in heads.modules() if isinstance(m, (CrossAttentionLayer, SelfAttentionLayer, FFNLayer))]
    assert len(layers) == 3 * TINY["num_layers"] + 3
    for layer in layers:
        for name, p in layer.named_parameters():
            if p.dim() > 1:
                bound = (6 / (p.shape[0] + p.shape[1])) ** 0.5
                assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound, name
            elif name.endswith("in_proj_bias") or name.endswith("out_proj.bias"):
                assert (p == 0).all(), name
    # nn.Embedding default: standard normal (not a xavier bound)
    assert heads.image_decoder.query_feat.weight.abs().max() > 2.0


# Every backend masked_cross_attention has, on each device where it runs (it has no "cuda" backend: on a
# GPU, "auto" and "triton" are the fast paths).
ATTN_BACKENDS = [("cpu", "auto"), ("cpu", "cpu"), ("cpu", "triton"),
                 pytest.param("cuda", "auto", marks=pytest.mark.gpu),
                 pytest.param("cuda", "triton", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,backend", ATTN_BACKENDS)
def test_attn_backend_swap_keeps_outputs(device, backend):
    """(f) Every attention backend gives the torch reference's outputs (1e-5) through image decoder +
    association + batch decoder. On CPU triton is its interpreter (TRITON_INTERPRET=1, a few seconds at
    these sizes); the GPU cases need the interpreter off."""
    device = triton_device_or_skip(device) if backend == "triton" else (
        cuda_or_skip() if device == "cuda" else torch.device("cpu"))
    heads = tiny_heads().to(device).eval()
    ms, mf = random_inputs(2, 3)
    ms, mf = [x.to(device) for x in ms], mf.to(device)
    outs = {}
    with torch.no_grad():
        for b in ("torch", backend):
            heads.image_decoder.attn_backend = b
            outs[b] = heads(ms, mf, num_views=3)
    ref_image, ref_init, ref_batch = outs["torch"]
    image, init, batch = outs[backend]
    assert_close(init, ref_init, name=f"{backend} association")
    for name, got, want in (("image", image, ref_image), ("batch", batch, ref_batch)):
        for i, ((lg, mg), (lw, mw)) in enumerate(zip(predictions(got), predictions(want))):
            assert_close(lg, lw, name=f"{backend} {name} logits[{i}]")
            assert_close(mg, mw, name=f"{backend} {name} masks[{i}]")
