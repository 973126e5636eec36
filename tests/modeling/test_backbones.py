"""Image encoders: parity with the original D2SwinTransformer / D2HorNet outputs, exact state-dict
layouts of the released configs, and forward/backward at awkward sizes.

Reference data: reference/golden_tiny (tiny Swin inside the golden CropFormer run), reference/hornet
(D2HorNet, base dim 32), reference/keys (state-dict listings of the released configs). Large models are
built on the meta device: only names, shapes and dtypes are compared.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cropformer.modeling.backbone import SWIN_PRESETS, HorNet, ResNet, SwinTransformer, build_backbone
from cropformer.modeling.backbone import hornet as hornet_module
from cropformer.modeling.backbone.hornet import GlobalLocalFilter, global_filter
from cropformer.modeling.backbone.resnet import FrozenBatchNorm2d
from cropformer.modeling.backbone.swin import relative_position_index, shifted_window_mask
from tests.conftest import assert_close, load_reference, reference_dir

PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
LEVELS = ("res2", "res3", "res4", "res5")


def released_backbone_entries(config: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name without `backbone.`, shape, dtype) of the original's state dict, in order."""
    entries = []
    for line in (reference_dir("keys") / f"{config}.txt").read_text().splitlines():
        if line.startswith("backbone."):
            name, shape, dtype = line.split("\t")
            entries.append((name[len("backbone."):], tuple(int(s) for s in shape.split(",")), dtype))
    return entries


def state_dict_entries(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]


def assert_same_entries(ours, theirs):
    missing = [e for e in theirs if e not in ours]
    extra = [e for e in ours if e not in theirs]
    assert not missing and not extra, f"missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})"
    assert ours == theirs, "same entries, different state-dict order"


def assert_all_grads(module: torch.nn.Module):
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# ----------------------------------------------------------------------------------------------- Swin


def tiny_swin() -> SwinTransformer:
    """The golden run's backbone: embed 32, depths 1-1-2-1, heads 1-2-4-8, window 7, drop-path 0."""
    return SwinTransformer(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7,
                           drop_path_rate=0.0)


def golden_backbone_state_dict() -> dict[str, torch.Tensor]:
    sd = load_file(reference_dir("golden_tiny") / "tiny_state_dict.safetensors")
    return {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}


def test_swin_golden_tiny():
    """Training batch of the golden run (full image 128 x 160 and crop 128 x 161, normalised, zero padded
    after normalisation to 2 x 3 x 128 x 192): stage maps 32 x 48 ... 4 x 6 are not window multiples, and
    the shifted block of res4 (8 x 12 padded to 14 x 14) uses the region mask."""
    inputs = load_reference("golden_tiny", "inputs.pt")
    outputs = load_reference("golden_tiny", "outputs.pt")
    model = tiny_swin().eval()
    model.load_state_dict(golden_backbone_state_dict(), strict=True)
    x = torch.zeros(2, 3, 128, 192)
    x[0, :, :, :160] = (inputs["train.image"].float() - PIXEL_MEAN) / PIXEL_STD
    x[1, :, :, :161] = (inputs["train.image_crop"][0].float() - PIXEL_MEAN) / PIXEL_STD
    with torch.no_grad():
        feats = model(x)
    assert list(feats) == list(LEVELS)
    for name in LEVELS:
        assert_close(feats[name], outputs[f"train.backbone.{name}"], rtol=0, atol=1e-4, name=name)


def test_swin_relative_position_index_matches_original():
    """Our computed buffers (not the loaded ones) equal those stored by the original."""
    golden = golden_backbone_state_dict()
    ours = tiny_swin().state_dict()
    names = [k for k in golden if k.endswith("relative_position_index")]
    assert len(names) == 5
    for k in names:
        assert ours[k].dtype == torch.int64
        assert torch.equal(ours[k], golden[k]), k


@pytest.mark.parametrize("ws", [3, 7, 12])
def test_relative_position_index_by_definition(ws):
    """index[(y1, x1), (y2, x2)] = (y1 - y2 + ws - 1) * (2 ws - 1) + (x1 - x2 + ws - 1), row-major tokens."""
    idx = relative_position_index(ws)
    assert idx.shape == (ws * ws, ws * ws) and idx.dtype == torch.int64
    ys, xs = torch.arange(ws * ws) // ws, torch.arange(ws * ws) % ws
    expected = (ys[:, None] - ys[None, :] + ws - 1) * (2 * ws - 1) + (xs[:, None] - xs[None, :] + ws - 1)
    assert torch.equal(idx, expected)
    assert int(idx.max()) == (2 * ws - 1) ** 2 - 1


@pytest.mark.parametrize("Hp,Wp,ws", [(14, 14, 7), (7, 21, 7), (24, 36, 12), (35, 49, 7)])
def test_shifted_window_mask_blocks_exactly_wrapped_pairs(Hp, Wp, ws):
    """After rolling by -s, a window token at rolled row r came from row (r + s) mod Hp; two tokens of
    one window may attend to each other iff, on both axes, either both or neither wrapped around."""
    s = ws // 2
    mask = shifted_window_mask(Hp, Wp, ws, s)
    nWh, nWw = Hp // ws, Wp // ws
    assert mask.shape == (nWh * nWw, ws * ws, ws * ws)
    r = torch.arange(ws * ws) // ws
    c = torch.arange(ws * ws) % ws
    for wi in range(nWh):
        for wj in range(nWw):
            wrap_r = (wi * ws + r + s) >= Hp
            wrap_c = (wj * ws + c + s) >= Wp
            same = (wrap_r[:, None] == wrap_r[None, :]) & (wrap_c[:, None] == wrap_c[None, :])
            expected = torch.where(same, 0.0, -100.0)
            assert torch.equal(mask[wi * nWw + wj], expected), (wi, wj)


@pytest.mark.parametrize("preset,config", [("tiny", "cropformer_swin_tiny_3x"), ("large", "cropformer_swin_large_3x")])
def test_swin_state_dict_matches_released(preset, config):
    theirs = released_backbone_entries(config)
    with torch.device("meta"):
        model = SwinTransformer(**SWIN_PRESETS[preset], window_size=7, drop_path_rate=0.3)
    ours = state_dict_entries(model)
    assert_same_entries(ours, theirs)
    floats = sum(math.prod(s) for _, s, d in ours if d == "float32")
    assert floats == {"tiny": 27_520_698, "large": 194_998_164}[preset]  # keys/README.md
    assert model.out_channels == {f"res{i + 2}": SWIN_PRESETS[preset]["embed_dim"] * 2**i for i in range(4)}
    assert model.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@pytest.mark.parametrize("window_size", [7, 12])
def test_swin_forward_backward_odd_size(window_size):
    """90 x 70 input: not a multiple of the patch (padded), maps 23 x 18 -> 12 x 9 -> 6 x 5 -> 3 x 3 are odd
    (patch merging pads) and smaller than a window; training mode with drop-path and dropouts."""
    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=window_size,
                            drop_path_rate=0.2, drop_rate=0.1, attn_drop_rate=0.1).train()
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * window_size - 1) ** 2, 1)
    feats = model(torch.randn(2, 3, 90, 70))
    sizes = [(23, 18), (12, 9), (6, 5), (3, 3)]
    for (name, f), (h, w), c in zip(feats.items(), sizes, (16, 32, 64, 128)):
        assert f.shape == (2, c, h, w), name
        assert torch.isfinite(f).all()
    sum((f * torch.randn_like(f)).sum() for f in feats.values()).backward()
    assert_all_grads(model)


def test_swin_checkpointing_same_result():
    """use_checkpoint recomputes blocks in backward: same outputs and gradients (eval: no randomness)."""
    torch.manual_seed(1)
    a = SwinTransformer(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4), drop_path_rate=0.0).eval()
    b = SwinTransformer(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4), drop_path_rate=0.0,
                        use_checkpoint=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 96)
    fa, fb = a(x), b(x)
    sum(f.square().sum() for f in fa.values()).backward()
    sum(f.square().sum() for f in fb.values()).backward()
    for name in LEVELS:
        assert_close(fb[name], fa[name], name=name)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, name=name)


def test_swin_drop_path_rates_linear():
    model = SwinTransformer(embed_dim=16, depths=(2, 2, 6, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.3)
    rates = [blk.drop_path.p for layer in model.layers for blk in layer.blocks]
    assert rates == pytest.approx([0.3 * k / 11 for k in range(12)], abs=1e-7)


# --------------------------------------------------------------------------------------------- HorNet


def test_hornet_reference_outputs():
    """Original D2HorNet at base dim 32 (perturbed random weights), input 1 x 3 x 160 x 224: the
    filters resize 24 x 13 -> 10 x 8 (res4) and 12 x 7 -> 5 x 4 (res5, odd width 7). The README puts the
    float32 noise floor at ~2e-6 and filter mistakes at >= 6e-4, so 2e-5 separates them."""
    ref = reference_dir("hornet")
    model = HorNet(base_dim=32).eval()
    model.load_state_dict(load_file(ref / "weights.safetensors"), strict=True)
    x = load_reference("hornet", "input_a.pt")["input"]
    expected = load_reference("hornet", "outputs_a.pt")
    with torch.no_grad():
        feats = model(x)
    assert list(feats) == list(LEVELS)
    for name in LEVELS:
        assert_close(feats[name], expected[name], rtol=0, atol=2e-5, name=name)


def test_hornet_state_dict_matches_released():
    theirs = released_backbone_entries("cropformer_hornet_3x")
    with torch.device("meta"):
        model = HorNet()
    ours = state_dict_entries(model)
    assert_same_entries(ours, theirs)
    assert sum(math.prod(s) for _, s, _ in ours) == 200_272_512  # keys/README.md
    assert model.out_channels == {"res2": 192, "res3": 384, "res4": 768, "res5": 1536}
    assert model.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert model.stages[2][0].gnconv.dwconv.complex_weight.shape == (720, 24, 13, 2)
    assert model.stages[3][1].gnconv.dwconv.complex_weight.shape == (1488, 12, 7, 2)


def bilinear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """n_out x n_in float64 linear interpolation with align_corners=True (source = i (n_in-1)/(n_out-1))."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m


def global_filter_straightforward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float64, full complex FFT: the half-spectrum weight (resized with explicit bilinear matrices) is
    extended to all W columns by Hermitian symmetry, W[k, l] = conj(W[-k, W - l]) for l > W // 2, which is
    what irfft2 of (rfft2(x) * W) computes; B x C x H x W -> same."""
    H, W = x.shape[-2:]
    Wh = W // 2 + 1
    w = weight.double()
    w = torch.einsum("ih,chwk,jw->cijk", bilinear_matrix(H, w.shape[1]), w, bilinear_matrix(Wh, w.shape[2]))
    half = torch.complex(w[..., 0], w[..., 1])  # C x H x Wh
    full = torch.empty(w.shape[0], H, W, dtype=torch.complex128)
    full[:, :, :Wh] = half
    for col in range(Wh, W):
        full[:, :, col] = half[:, (-torch.arange(H)) % H, W - col].conj()
    spec = torch.fft.fft2(x.double(), norm="ortho") * full
    return torch.fft.ifft2(spec, norm="ortho").real


def global_local_filter_straightforward(m: GlobalLocalFilter, x: torch.Tensor) -> torch.Tensor:
    """float64 re-computation of the filter block from its parameters (channel LayerNorm by its formula,
    explicit channel interleave)."""

    def channel_ln(t, norm):
        mu = t.mean(1, keepdim=True)
        var = (t - mu).square().mean(1, keepdim=True)
        t = (t - mu) / torch.sqrt(var + norm.eps)
        return t * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]

    t = channel_ln(x.double(), m.pre_norm)
    c = t.shape[1] // 2
    a = F.conv2d(t[:, :c], m.dw.weight.double(), padding=1, groups=c)
    b = global_filter_straightforward(t[:, c:], m.complex_weight.detach())
    out = torch.empty_like(t)
    out[:, 0::2] = a
    out[:, 1::2] = b
    return channel_ln(out, m.post_norm)


def randomised_filter(dim: int, h: int, w: int) -> GlobalLocalFilter:
    m = GlobalLocalFilter(dim, h=h, w=w)
    with torch.no_grad():
        for p in m.parameters():  # make the norms and the complex weight matter
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 4 else 1.0))
    return m


# (map size, weight size): odd heights/widths, weights larger and smaller than the rFFT size; the first
# two are the res5 / res4 maps of the HorNet reference input.
@pytest.mark.parametrize("hw,weight_hw", [((5, 7), (12, 7)), ((10, 14), (24, 13)), ((9, 13), (12, 7)),
                                          ((7, 5), (24, 13)), ((31, 30), (12, 7)), ((1, 1), (12, 7))])
def test_global_local_filter_matches_straightforward(hw, weight_hw):
    torch.manual_seed(2)
    m = randomised_filter(12, *weight_hw)
    x = torch.randn(2, 12, *hw)
    with torch.no_grad():
        y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert_close(y, global_local_filter_straightforward(m, x), rtol=1e-5, atol=1e-5, name=f"filter {hw}")


@pytest.mark.parametrize("hw", [(24, 24), (24, 25)])  # rFFT size 24 x 13 for both widths
def test_global_filter_native_size_skips_resize(hw, monkeypatch):
    torch.manual_seed(3)
    weight = torch.randn(6, 24, 13, 2)
    x = torch.randn(1, 6, *hw)
    calls = []
    real_interpolate = F.interpolate

    def counting_interpolate(*args, **kwargs):
        calls.append(kwargs.get("size"))
        return real_interpolate(*args, **kwargs)

    monkeypatch.setattr(hornet_module.F, "interpolate", counting_interpolate)
    y = global_filter(x, weight)
    assert calls == [], f"resized at the native size: {calls}"
    expected = torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho") * torch.view_as_complex(weight), s=hw, norm="ortho")
    assert_close(y, expected, name="native")
    global_filter(torch.randn(1, 6, 23, 24), weight)  # 23 x 13 rFFT: must resize
    assert calls == [(23, 13)]


def test_hornet_forward_backward():
    """Small HorNet in training mode (drop-path on); every parameter, the complex weights included,
    gets a gradient; checkpointing gives the same result in eval mode."""
    torch.manual_seed(4)
    kwargs = dict(base_dim=16, depths=(1, 1, 2, 1), drop_path_rate=0.2, layer_scale_init_value=0.5)
    model = HorNet(**kwargs).train()
    x = torch.randn(2, 3, 64, 96)
    feats = model(x)
    for (name, f), c, s in zip(feats.items(), (16, 32, 64, 128), (4, 8, 16, 32)):
        assert f.shape == (2, c, 64 // s, 96 // s), name
    sum((f * torch.randn_like(f)).sum() for f in feats.values()).backward()
    assert_all_grads(model)

    ckpt = HorNet(**kwargs, use_checkpoint=True).eval()
    ckpt.load_state_dict(model.state_dict())
    model.eval()
    for name in LEVELS:
        assert_close(ckpt(x)[name], model(x)[name], name=name)


# --------------------------------------------------------------------------------------------- ResNet


def test_resnet50_layout_shapes_and_backward():
    torch.manual_seed(5)
    model = ResNet()
    sd = model.state_dict()
    # detectron2 names: 53 convs, each `weight` + FrozenBN weight/bias/running_mean/running_var
    assert len(sd) == 53 * 5
    assert list(sd)[:7] == ["stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.bias",
                            "stem.conv1.norm.running_mean", "stem.conv1.norm.running_var",
                            "res2.0.shortcut.weight", "res2.0.shortcut.norm.weight"]
    assert "res2.1.shortcut.weight" not in sd and "res5.2.conv3.norm.running_var" in sd
    assert not any("num_batches_tracked" in k or k.endswith(".bias") and ".norm." not in k for k in sd)
    assert sd["res3.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["res5.0.shortcut.weight"].shape == (2048, 1024, 1, 1)
    # torchvision resnet50 has 25,557,032 parameters: minus fc (2,049,000) and BN affine (53,120)
    assert sum(p.numel() for p in model.parameters()) == 23_454_912
    assert all(n.endswith("weight") and ".norm." not in n for n, _ in model.named_parameters())
    assert model.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    assert model.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    # stride in the 3x3 conv (STRIDE_IN_1X1 False)
    assert model.res3[0].conv1.stride == (1, 1) and model.res3[0].conv2.stride == (2, 2)

    feats = model(torch.randn(1, 3, 64, 96))
    for name in LEVELS:
        s = model.strides[name]
        assert feats[name].shape == (1, model.out_channels[name], 64 // s, 96 // s), name
    sum(f.mean() for f in feats.values()).backward()
    assert_all_grads(model)


def test_frozen_batchnorm_is_eval_batchnorm():
    torch.manual_seed(6)
    bn = FrozenBatchNorm2d(5)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).copy_(torch.randn(5))
    bn.running_var.copy_(torch.rand(5) + 0.1)
    x = torch.randn(2, 5, 3, 4)
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=1e-5)
    assert_close(bn(x), expected, name="frozen bn")
    fresh = FrozenBatchNorm2d(5)
    assert_close(fresh(x), x, name="fresh frozen bn is identity")


def test_resnet_freeze_at():
    model = ResNet(freeze_at=2)
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "res2"}


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_resnet_other_norms(norm):
    """detectron2's other norm names; freezing turns frozen BatchNorms into FrozenBN (same function)."""
    torch.manual_seed(7)
    # half width (GroupNorm's 32 groups still divide every width) to keep the test fast
    model = ResNet(depth=50, norm=norm, stem_out_channels=32, res2_out_channels=128, width_per_group=32)
    assert isinstance(model.res4[5].conv3.norm, torch.nn.BatchNorm2d if norm == "BN" else torch.nn.GroupNorm)
    x = torch.randn(2, 3, 64, 64)
    feats = model(x)
    assert feats["res5"].shape == (2, 1024, 2, 2)
    if norm == "BN":
        model.eval()
        before = model(x)["res3"]
        model.freeze(3)
        assert isinstance(model.res3[0].conv1.norm, FrozenBatchNorm2d)
        assert isinstance(model.res4[0].conv1.norm, torch.nn.BatchNorm2d)
        assert "res3.0.conv1.norm.num_batches_tracked" not in model.state_dict()
        assert_close(model(x)["res3"], before, name="frozen BN conversion")


# ---------------------------------------------------------------------------------------------- build


def test_build_backbone():
    model = build_backbone("swin", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    assert isinstance(model, SwinTransformer)
    assert isinstance(build_backbone("hornet", base_dim=8, depths=(1, 1, 1, 1)), HorNet)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit")
