"""Checkpoint conversion and loading (cropformer/convert.py, cropformer/checkpoint.py).

- HorNet configs reproduce the original's key lists (built on the meta device).
- Every released layout (shared/reference/keys/*.txt: exact names, shapes and dtypes of the original's
  state dicts), ImageNet Swin / HorNet / ResNet weights and HF Mask2Former files convert with every
  tensor landing on the right key with the right values. Full-size checkpoints are written with
  "marker" tensors: tensor i holds (i + 1) * 4096 + (column index) broadcast over its leading
  dimensions, so each file stores one row per tensor (a few kB in all) while every tensor is still
  told apart by its values and every value is compared after loading.
- Tiny models: weights exported in the original's names (official `.pth`, top-level `.pth`, `.pkl` of
  numpy arrays, Mask2Former-style `.pkl` of torch tensors, `.safetensors`) and read back give exactly
  the outputs of the model they came from.
- Refusals: malicious pickles (no file is created), and weights that do not fit the config (Swin-L
  into Swin-T, 200 queries into 100, window 12 into window 7, another backbone), each message naming
  the first mismatching keys.
- The `python -m cropformer.convert` command line.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cropformer.checkpoint import (
    WeightsMismatch,
    check_fit,
    load_model_weights,
    read_checkpoint,
    read_weights,
    save_weights,
)
from cropformer.config import load_config
from cropformer.cli.convert import main
from cropformer.convert import (
    ORIGINAL_TO_OURS,
    convert_state_dict,
    ours_to_original,
    rename_key,
)
from cropformer.modeling.backbone.hornet import HorNet
from cropformer.modeling.backbone.resnet import ResNet
from cropformer.modeling.backbone.swin import SwinTransformer
from cropformer.modeling.build import build_model
from tests.conftest import REPO, reference_dir

RELEASED = ["cropformer_swin_tiny_3x", "cropformer_swin_large_3x", "cropformer_hornet_3x",
            "mask2former_swin_tiny_3x", "mask2former_hornet_3x"]
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def _reference_keys(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the original's state dict for a released config, in its order."""
    keys = {}
    for line in (reference_dir("keys") / f"{name}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            keys[key] = (tuple(int(s) for s in shape.split(",")), DTYPES[dtype])
    return keys


def _marker(i: int, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """Tensor number i of a synthetic checkpoint: (i + 1) * 4096 + column index, broadcast over the
    leading dimensions (stored as one row; exact in float32 for i < 4000 and rows < 4096)."""
    if not shape:
        return torch.tensor((i + 1) * 4096, dtype=dtype)
    row = (i + 1) * 4096 + torch.arange(shape[-1], dtype=torch.float64) % 4096
    return row.to(dtype).expand(shape)


def _marked(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    return {k: _marker(i, shape, dtype) for i, (k, (shape, dtype)) in enumerate(shapes.items())}


def _shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {prefix + k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def _meta_model(config: str, overrides=()):
    with torch.device("meta"):
        return build_model(load_config(config, list(overrides)).model)


def _assert_landed(converted: dict[str, torch.Tensor], source: dict[str, torch.Tensor], expected_names: dict[str, str]):
    """Every source tensor named in `expected_names` (source key -> our key) sits at its key with the
    same dtype and values; nothing else is in `converted`."""
    assert sorted(converted) == sorted(expected_names.values()), (
        f"extra {sorted(set(converted) - set(expected_names.values()))[:5]}, "
        f"missing {sorted(set(expected_names.values()) - set(converted))[:5]}")
    wrong = [(src, dst) for src, dst in expected_names.items()
             if converted[dst].dtype != source[src].dtype or not torch.equal(converted[dst], source[src])]
    assert not wrong, f"tensors not where they belong (source -> ours): {wrong[:5]}"


def _save(obj, path, kind: str) -> None:
    """Write a checkpoint the way the tool that makes such files does."""
    if kind == "torch":
        torch.save(obj, path)
    elif kind == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif kind == "pickle-numpy":  # detectron2 model-zoo .pkl: numpy arrays, pickle protocol 2
        obj = {k: ({n: v.numpy() for n, v in d.items()} if k == "model" else d) for k, d in obj.items()}
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    elif kind == "pickle-torch":  # Mask2Former's convert-pretrained-swin-model-to-d2.py: tensors, plain pickle
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        raise ValueError(kind)


# --------------------------------------------------------------------------------------------------
# HorNet configs


@pytest.mark.parametrize("config", ["cropformer_hornet_3x", "mask2former_hornet_3x"])
def test_hornet_config_matches_original_keys(config):
    cfg = load_config(config)
    assert cfg.model.backbone.name == "hornet" and cfg.model.decoder.num_queries == 200
    h = cfg.model.backbone.hornet
    assert (h.base_dim, tuple(h.depths), h.drop_path_rate) == (192, (2, 3, 18, 2), 0.6)
    assert (cfg.solver.ims_per_batch, cfg.solver.max_iter) == (8, 206250)
    assert cfg.model.meta_architecture == config.split("_")[0]
    with torch.device("meta"):
        model = build_model(cfg.model)
    ours = {k: (tuple(v.shape), v.dtype) for k, v in ours_to_original(model.state_dict()).items()}
    ref = {k: v for k, v in _reference_keys(config).items() if not k.startswith("criterion")}
    assert sorted(ours) == sorted(ref), f"missing {sorted(set(ref) - set(ours))[:10]}, extra {sorted(set(ours) - set(ref))[:10]}"
    wrong = [(k, ours[k], ref[k]) for k in ref if ours[k] != ref[k]]
    assert not wrong, f"shape/dtype mismatches: {wrong[:10]}"


# --------------------------------------------------------------------------------------------------
# Released checkpoints of the original (exact key lists)


@pytest.mark.parametrize("wrap", ["model", "top-level"])
@pytest.mark.parametrize("name", RELEASED)
def test_released_checkpoint_converts_every_tensor(tmp_path, name, wrap):
    source = _marked(_reference_keys(name))
    path = tmp_path / f"{name}.pth"
    torch.save({"model": source, "__author__": "qqlu"} if wrap == "model" else source, path)
    loaded = read_checkpoint(path)
    assert loaded.report.format == "detectron2" and loaded.config is None
    assert sorted(loaded.report.dropped) == sorted(k for k in source if k.startswith("criterion"))
    _assert_landed(loaded.state, source, {k: rename_key(k) for k in source if not k.startswith("criterion")})
    fit = check_fit(_meta_model(name).state_dict(), loaded.state, source=str(path), strict=True)
    assert not fit.missing and not fit.unexpected and not fit.ignored


def test_original_table_round_trips():
    """ours_to_original inverts the table for every prefix (the association rules before image_decoder)."""
    for old, new in ORIGINAL_TO_OURS:
        key = old + "x.weight"
        assert rename_key(key) == new + "x.weight"
        assert ours_to_original({new + "x.weight": torch.zeros(1)}) == {key: torch.zeros(1)}


def test_legacy_pixel_decoder_prefixes_and_ddp_prefix(tmp_path):
    """COCO-entity initialisations with the doubled `sem_seg_head.pixel_decoder.pixel_decoder.` prefix,
    pre-v2 MaskFormer heads without `pixel_decoder.`, and `module.`-prefixed (DDP) states all give the
    canonical conversion."""
    source = _marked(_reference_keys("mask2former_swin_tiny_3x"))
    canonical, _ = convert_state_dict(source)
    variants = {
        "nested": {k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head.pixel_decoder.pixel_decoder."): v for k, v in source.items()},
        "pre-v2": {k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head."): v for k, v in source.items()},
        "ddp": {"module." + k: v for k, v in source.items()},
    }
    for variant, state in variants.items():
        assert state.keys() != source.keys()
        torch.save({"model": state}, tmp_path / f"{variant}.pth")
        converted, _ = read_weights(tmp_path / f"{variant}.pth")
        assert converted.keys() == canonical.keys(), variant
        assert all(torch.equal(converted[k], canonical[k]) for k in canonical), variant


def test_mask2former_checkpoint_initialises_cropformer():
    """Partial loads at component granularity: Mask2Former weights leave CropFormer's association
    module at its init (refused when strict); CropFormer weights for Mask2Former drop the association."""
    m2f, _ = convert_state_dict(_marked(_reference_keys("mask2former_swin_tiny_3x")))
    crop_own = _meta_model("cropformer_swin_tiny_3x").state_dict()
    fit = check_fit(crop_own, m2f, strict=False)
    assert fit.absent_components == ["association"]
    assert fit.missing == [k for k in crop_own if k.startswith("association.")] and not fit.unexpected
    with pytest.raises(WeightsMismatch, match=r"missing \(18\): association\.cross_attention_layers\.0\.multihead_attn\.in_proj_weight"):
        check_fit(crop_own, m2f, strict=True)
    crop, _ = convert_state_dict(_marked(_reference_keys("cropformer_swin_tiny_3x")))
    fit = check_fit(_meta_model("mask2former_swin_tiny_3x").state_dict(), crop, strict=False)
    assert len(fit.unexpected) == 18 and all(k.startswith("association.") for k in fit.unexpected)


# --------------------------------------------------------------------------------------------------
# Tiny models: outputs with converted weights equal outputs with the weights loaded directly


@torch.no_grad()
def _randomise_(model: nn.Module, seed: int) -> None:
    """Every float entry of the state dict gets seeded random values far from its init (norm scales and
    biases included, so a swapped norm shows); variances stay positive."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():  # not the non-persistent pixel mean/std
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=gen)
        if name.endswith("running_var"):
            t.copy_(0.5 + noise.abs())
        elif t.dim() > 1:
            t.copy_(noise / t[0].numel() ** 0.5)
        else:
            t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)


TINY = {
    "swin": [],
    "hornet": ['model.backbone.name="hornet"', "model.backbone.hornet.base_dim=16",
               "model.backbone.hornet.depths=[1,1,1,1]", "model.backbone.hornet.drop_path_rate=0.0"],
}


def _tiny_pair(backbone: str):
    cfg = load_config("tiny", TINY[backbone] + ['model.msda_backend="torch"', 'model.attn_backend="torch"'])
    torch.manual_seed(0)
    a = build_model(cfg.model).eval()
    _randomise_(a, seed=1)
    torch.manual_seed(1)
    b = build_model(cfg.model).eval()
    return cfg, a, b


def _official_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the original's names, with the criterion buffers the original saves."""
    state = {k: v.clone() for k, v in ours_to_original(model.state_dict()).items()}
    state["criterion_2d.empty_weight"] = torch.tensor([1.0, 0.1])
    state["criterion_3d.empty_weight"] = torch.tensor([1.0, 0.1])
    return state


@pytest.mark.parametrize("backbone,kind,suffix", [
    ("swin", "torch", ".pth"),
    ("swin", "torch-top-level", ".pth"),
    ("swin", "torch-legacy", ".pth"),
    ("swin", "pickle-numpy", ".pkl"),
    ("swin", "pickle-torch", ".pkl"),
    ("swin", "safetensors", ".safetensors"),
    ("hornet", "torch", ".pth"),
    ("hornet", "pickle-numpy", ".pkl"),
])
def test_tiny_outputs_equal_after_conversion(tmp_path, backbone, kind, suffix):
    cfg, a, b = _tiny_pair(backbone)
    official = _official_state(a)
    path = tmp_path / f"official{suffix}"
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in official.items()}, str(path))
    elif kind == "torch-top-level":
        torch.save(official, path)
    else:
        _save({"model": official, "__author__": "test", "matching_heuristics": True}, path, kind)
    state, stored = read_weights(path)
    assert stored is None
    report = load_model_weights(b, state, source=str(path), strict=True)
    assert not report["missing"] and not report["unexpected"]
    mine = a.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in b.state_dict().items())
    images = torch.randint(0, 256, (1, 2, 3, 70, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out_a, out_b = a(images), b(images)
    for level in ("image", "batch"):
        for key in ("pred_logits", "pred_masks"):
            assert torch.equal(out_a[level][key], out_b[level][key]), f"{level} {key} differ"
    assert torch.equal(out_a["association"], out_b["association"])


# --------------------------------------------------------------------------------------------------
# ImageNet backbone weights


SWIN_SIZES = {  # official Swin-T/S/B/L (window 7, 224 inputs)
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "B": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "L": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def _swin_overrides(size: str, window: int = 7) -> list[str]:
    embed, depths, heads = SWIN_SIZES[size]
    return [f"model.backbone.swin.embed_dim={embed}", f"model.backbone.swin.depths={list(depths)}",
            f"model.backbone.swin.num_heads={list(heads)}", f"model.backbone.swin.window_size={window}"]


def _official_swin_shapes(size: str, window: int = 7, classes: int = 1000, image: int = 224):
    """Key names and shapes of the official Swin classification checkpoints (microsoft/Swin-Transformer
    `swin_*.pth`, under "model"): our backbone's names without `image_encoder.` and without
    detectron2's output norms norm0..norm3, plus the final `norm`, the `head` and the persistent
    `attn_mask` buffer of every shifted block (one mask per window of a 224 (or 384) input)."""
    embed, depths, heads = SWIN_SIZES[size]
    with torch.device("meta"):
        swin = SwinTransformer(embed_dim=embed, depths=depths, num_heads=heads, window_size=window)
    shapes = {k: v for k, v in _shapes(swin).items() if not k.startswith("norm")}
    res = image // 4
    for i, depth in enumerate(depths):
        windows = (-(-(res >> i) // window)) ** 2
        if res >> i <= window:  # the official Swin drops the shift (and its mask) when one window covers the map
            continue
        for j in range(1, depth, 2):
            shapes[f"layers.{i}.blocks.{j}.attn_mask"] = ((windows, window * window, window * window), torch.float32)
    c = embed * 8
    shapes.update({"norm.weight": ((c,), torch.float32), "norm.bias": ((c,), torch.float32),
                   "head.weight": ((classes, c), torch.float32), "head.bias": ((classes,), torch.float32)})
    return shapes


@pytest.mark.parametrize("size", ["T", "S", "B", "L"])
def test_swin_imagenet_weights(tmp_path, size):
    source = _marked(_official_swin_shapes(size))
    torch.save({"model": source}, tmp_path / "swin.pth")
    loaded = read_checkpoint(tmp_path / "swin.pth")
    assert loaded.report.format == "swin"
    dropped = [k for k in source if k.startswith(("head.", "norm.")) or k.endswith("attn_mask")]
    assert sorted(loaded.report.dropped) == sorted(dropped) and len(dropped) > 4
    _assert_landed(loaded.state, source, {k: "image_encoder." + k for k in source if k not in dropped})
    own = _meta_model("cropformer_swin_tiny_3x", _swin_overrides(size)).state_dict()
    fit = check_fit(own, loaded.state, strict=False)
    assert [k for k in fit.missing if k.startswith("image_encoder.")] == [
        f"image_encoder.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert fit.absent_components == ["pixel_decoder", "image_decoder", "association"]
    with pytest.raises(WeightsMismatch, match=r"image_encoder\.norm0\.weight"):
        check_fit(own, loaded.state, strict=True)


def test_mask2former_converted_swin_pkl(tmp_path):
    """Mask2Former's `swin_tiny_patch4_window7_224.pkl`: the official state (torch tensors) pickled
    with plain pickle under "model"; values checked on a tiny Swin."""
    torch.manual_seed(0)
    swin = SwinTransformer(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
    _randomise_(swin, seed=2)
    source = {k: v.clone() for k, v in swin.state_dict().items() if not k.startswith("norm")}
    source.update({"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256),
                   "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000),
                   "layers.2.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    _save({"model": source, "__author__": "third_party", "matching_heuristics": True}, tmp_path / "swin.pkl", "pickle-torch")
    state, _ = read_weights(tmp_path / "swin.pkl")
    _assert_landed(state, source, {k: "image_encoder." + k for k in source if not k.startswith(("norm", "head")) and "attn_mask" not in k})


def _official_hornet_shapes(classes: int = 21841):
    """Official HorNet classification checkpoints (raoyongming/HorNet `hornet_large_gf*.pth`, under
    "model"): HorNet-L with global filters for 384 inputs (24 x 13, 12 x 7; what D2HorNet builds),
    names as ours without the output norms, plus the final `norm` and `head`."""
    with torch.device("meta"):
        hornet = HorNet()
    shapes = {k: v for k, v in _shapes(hornet).items() if not k.startswith("norm")}
    shapes.update({"norm.weight": ((1536,), torch.float32), "norm.bias": ((1536,), torch.float32),
                   "head.weight": ((classes, 1536), torch.float32), "head.bias": ((classes,), torch.float32)})
    return shapes


def test_hornet_imagenet_weights(tmp_path):
    source = _marked(_official_hornet_shapes())
    torch.save({"model": source}, tmp_path / "hornet.pth")
    loaded = read_checkpoint(tmp_path / "hornet.pth")
    assert loaded.report.format == "hornet"
    dropped = ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert sorted(loaded.report.dropped) == sorted(dropped)
    _assert_landed(loaded.state, source, {k: "image_encoder." + k for k in source if k not in dropped})
    fit = check_fit(_meta_model("cropformer_hornet_3x").state_dict(), loaded.state, strict=False)
    assert [k for k in fit.missing if k.startswith("image_encoder.")] == [
        f"image_encoder.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    # weights for 224 inputs have 14 x 8 / 7 x 4 filters: refused, with the reason
    small = dict(source)
    small["stages.2.0.gnconv.dwconv.complex_weight"] = _marker(0, (360, 14, 8, 2))
    torch.save({"model": small}, tmp_path / "hornet224.pth")
    with pytest.raises(WeightsMismatch, match=r"HorNet global filter: weights \(14, 8\), model \(24, 13\)"):
        load_model_weights(_meta_model("cropformer_hornet_3x"), read_weights(tmp_path / "hornet224.pth")[0], strict=False)


def _torchvision_resnet50_shapes() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """torchvision `resnet50` state-dict names and shapes, written out independently of our model."""
    f32 = torch.float32
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = ((c,), f32)
        shapes[f"{name}.num_batches_tracked"] = ((), torch.int64)

    shapes["conv1.weight"] = ((64, 3, 7, 7), f32)
    bn("bn1", 64)
    cin = 64
    for layer, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = ((width, cin, 1, 1), f32)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = ((width, width, 3, 3), f32)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = ((4 * width, width, 1, 1), f32)
            bn(f"{p}.bn3", 4 * width)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = ((4 * width, cin, 1, 1), f32)
                bn(f"{p}.downsample.1", 4 * width)
            cin = 4 * width
    shapes["fc.weight"] = ((1000, 2048), f32)
    shapes["fc.bias"] = ((1000,), f32)
    return shapes


def _torchvision_to_detectron2(key: str) -> str:
    """The rename of detectron2's tools/convert-torchvision-to-d2.py, restated for the test."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


RESNET = ['model.backbone.name="resnet"']


def test_resnet50_torchvision_weights(tmp_path):
    source = _marked(_torchvision_resnet50_shapes())
    torch.save(source, tmp_path / "resnet50.pth")
    loaded = read_checkpoint(tmp_path / "resnet50.pth")
    assert loaded.report.format == "resnet-torchvision"
    assert sorted(loaded.report.dropped) == ["fc.bias", "fc.weight"]
    _assert_landed(loaded.state, source, {k: "image_encoder." + _torchvision_to_detectron2(k) for k in source if not k.startswith("fc.")})
    own = _meta_model("cropformer_swin_tiny_3x", RESNET).state_dict()
    fit = check_fit(own, loaded.state, strict=False)  # FrozenBN has no step counter: ignored
    assert not [k for k in fit.missing if k.startswith("image_encoder.")]
    assert len(fit.ignored) == 53 and all(k.endswith("num_batches_tracked") for k in fit.ignored)


def test_resnet50_detectron2_pkl(tmp_path):
    """detectron2's ImageNetPretrained/torchvision/R-50.pkl: numpy arrays in detectron2 names, plus
    `stem.fc.*`; full names checked on R-50 (meta), values on a narrow R-50 through its forward."""
    with torch.device("meta"):
        full = _shapes(ResNet(depth=50))
    # our ResNet-50 has exactly the names detectron2's converter gives torchvision's weights
    tv = _torchvision_resnet50_shapes()
    d2 = {_torchvision_to_detectron2(k): v for k, v in tv.items() if not k.startswith("fc.") and "num_batches" not in k}
    assert d2 == full
    torch.manual_seed(0)
    a, b = (ResNet(depth=50, stem_out_channels=8, res2_out_channels=16, width_per_group=4).eval() for _ in range(2))
    _randomise_(a, seed=4)
    source = {k: v.clone() for k, v in a.state_dict().items()}
    assert sorted(source) == sorted(full)
    source.update({"stem.fc.weight": torch.zeros(1000, 128), "stem.fc.bias": torch.zeros(1000)})
    _save({"model": source, "__author__": "torchvision", "matching_heuristics": True}, tmp_path / "R-50.pkl", "pickle-numpy")
    loaded = read_checkpoint(tmp_path / "R-50.pkl")
    assert loaded.report.format == "resnet-d2" and sorted(loaded.report.dropped) == ["stem.fc.bias", "stem.fc.weight"]
    _assert_landed(loaded.state, source, {k: "image_encoder." + k for k in source if "fc." not in k})
    b.load_state_dict({k[len("image_encoder."):]: v for k, v in loaded.state.items()}, strict=True)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert all(torch.equal(a(x)[n], b(x)[n]) for n in ("res2", "res3", "res4", "res5"))


def test_caffe2_and_unknown_layouts_are_refused(tmp_path):
    torch.save({"conv1_w": torch.zeros(1), "res2_0_branch2a_w": torch.zeros(1)}, tmp_path / "c2.pth")
    with pytest.raises(RuntimeError, match="Caffe2-named weights"):
        read_weights(tmp_path / "c2.pth")
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="unknown checkpoint layout.*encoder.weight"):
        read_weights(tmp_path / "other.pth")
    torch.save({"backbone.x": torch.zeros(1), "sem_seg_head.predictor.y": torch.zeros(1), "extra.z": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(RuntimeError, match="does not know: extra.z"):
        read_weights(tmp_path / "odd.pth")


# --------------------------------------------------------------------------------------------------
# HuggingFace transformers' Mask2Former files


def test_hf_hub_file_converts_like_the_in_memory_names(tmp_path):
    """`save_pretrained` writes the hub layout (transformers 4 Swin names: attention.self.query, ...);
    read through read_weights it gives exactly what hf_to_ours gives for the in-memory names, and fits
    the tiny Mask2Former strictly (Swin's relative position index is recomputed, not stored)."""
    pytest.importorskip("transformers", exc_type=ImportError)
    from tests.hf_reference import build_hf, randomise_

    from cropformer.convert import hf_to_ours

    cfg = load_config("tiny", ['model.meta_architecture="mask2former"']).model
    torch.manual_seed(0)
    hf = build_hf(cfg)
    randomise_(hf, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    loaded = read_checkpoint(tmp_path / "hf" / "model.safetensors")
    assert loaded.report.format == "hf-mask2former"
    assert any(".attention.self.query." in k for k in loaded.report.renamed)  # the hub names were seen
    expected = hf_to_ours(hf.state_dict())
    assert sorted(loaded.state) == sorted(expected)
    assert all(torch.equal(loaded.state[k], expected[k]) for k in expected)
    model = build_model(cfg)
    report = load_model_weights(model, loaded.state, strict=True)
    assert report["ignored"] and all(k.endswith("relative_position_index") for k in report["ignored"])


# --------------------------------------------------------------------------------------------------
# Malicious pickles


class _OpenFile:
    """Unpickling this calls open(path, "w"): creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _System:
    """Unpickling this runs a shell command that creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _EvilStorageBytes:
    """Pickles as torch.storage._load_from_bytes(<a torch.save file holding an _OpenFile>)."""

    def __init__(self, path):
        import io

        buf = io.BytesIO()
        torch.save(_OpenFile(path), buf)
        self.data = buf.getvalue()

    def __reduce__(self):
        from torch.storage import _load_from_bytes

        return (_load_from_bytes, (self.data,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load's note on the nested payload
@pytest.mark.parametrize("payload", ["open", "system", "object-array", "storage-bytes"])
@pytest.mark.parametrize("kind,suffix", [("torch", ".pth"), ("torch-legacy", ".pth"), ("pickle", ".pkl"),
                                         ("pickle2", ".pkl"), ("torch", ".pkl"), ("pickle", ".pth")])
def test_malicious_pickle_is_refused(tmp_path, payload, kind, suffix):
    target = tmp_path / "pwned"
    evil = {"open": _OpenFile, "system": _System, "storage-bytes": _EvilStorageBytes}.get(payload)
    if payload == "object-array":
        value = np.array([_OpenFile(target), 1.0], dtype=object)
    else:
        value = evil(target)
    obj = {"model": {"backbone.patch_embed.proj.weight": value}}
    path = tmp_path / f"evil{suffix}"
    if kind.startswith("torch"):
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "torch")
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2 if kind == "pickle2" else 4)
    assert not target.exists()
    with pytest.raises(RuntimeError, match=r"not a loadable weights|refusing to load global|Unsupported global|weights_only"):
        read_weights(path)
    assert not target.exists(), "unpickling ran code from the file"


@pytest.mark.parametrize("protocol,numpy_module", [(0, None), (2, None), (2, "numpy.core"), (5, None)])
def test_safe_unpickler_reads_numpy_pickles(tmp_path, protocol, numpy_module):
    """numpy arrays pickled with every protocol (0: text, as old model-zoo files; 5: read-only buffers),
    and with numpy 1's module name `numpy.core` where numpy 2 writes `numpy._core`."""
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = pickle.dumps({"model": {"res2.0.conv1.weight": arr}, "__author__": "x"}, protocol=protocol)
    if numpy_module is not None:  # protocol 2 spells globals as text lines, so the name can be swapped
        data = data.replace(b"numpy._core.multiarray\n", f"{numpy_module}.multiarray\n".encode())
        assert f"{numpy_module}.multiarray".encode() in data
    (tmp_path / "old.pkl").write_bytes(data)
    state, _ = read_weights(tmp_path / "old.pkl")
    assert torch.equal(state["image_encoder.res2.0.conv1.weight"], torch.from_numpy(arr))


# --------------------------------------------------------------------------------------------------
# Weights that do not fit the config


def _released_state(name: str, tmp_path) -> dict[str, torch.Tensor]:
    torch.save({"model": _marked(_reference_keys(name))}, tmp_path / f"{name}.pth")
    return read_weights(tmp_path / f"{name}.pth")[0]


@pytest.mark.parametrize("strict", [True, False])
def test_swin_large_into_swin_tiny_is_refused(tmp_path, strict):
    state = _released_state("cropformer_swin_large_3x", tmp_path)
    with pytest.raises(WeightsMismatch) as info:
        load_model_weights(_meta_model("cropformer_swin_tiny_3x"), state, source="CropFormer_swin_large.pth", strict=strict)
    msg = str(info.value)
    assert msg.startswith("CropFormer_swin_large.pth does not fit this model")
    assert "image encoder: weights Swin (embed 192, depths 2-2-18-2, window 7), model Swin (embed 96, depths 2-2-6-2, window 7)" in msg
    assert "reshaped (" in msg and "image_encoder.patch_embed.proj.weight [192, 3, 4, 4] vs [96, 3, 4, 4]" in msg
    assert "unexpected (" in msg and "image_encoder.layers.2.blocks.6.norm1.weight" in msg


def test_200_queries_into_100_is_refused(tmp_path):
    state = _released_state("cropformer_hornet_3x", tmp_path)
    model = _meta_model("cropformer_hornet_3x", ["model.decoder.num_queries=100"])
    with pytest.raises(WeightsMismatch) as info:
        load_model_weights(model, state, source="CropFormer_hornet_3x.pth", strict=False)
    msg = str(info.value)
    assert "number of queries: weights 200, model 100 (model.decoder.num_queries)" in msg
    assert "image_decoder.query_feat.weight [200, 256] vs [100, 256]; image_decoder.query_embed.weight [200, 256] vs [100, 256]" in msg


def test_window_12_into_window_7_is_refused(tmp_path):
    """Swin-L ImageNet-22k weights for 384 inputs (window 12) into the released Swin-L (window 7)."""
    torch.save({"model": _marked(_official_swin_shapes("L", window=12, classes=21841, image=384))}, tmp_path / "w12.pth")
    state, _ = read_weights(tmp_path / "w12.pth")
    with pytest.raises(WeightsMismatch) as info:
        load_model_weights(_meta_model("cropformer_swin_large_3x"), state, source="swin_large_patch4_window12_384_22k.pth", strict=False)
    msg = str(info.value)
    assert "Swin window size: weights 12, model 7 (model.backbone.swin.window_size)" in msg
    assert ("image_encoder.layers.0.blocks.0.attn.relative_position_bias_table [529, 6] vs [169, 6]; "
            "image_encoder.layers.0.blocks.0.attn.relative_position_index [144, 144] vs [49, 49]") in msg


def test_other_backbone_is_refused(tmp_path):
    state = _released_state("mask2former_hornet_3x", tmp_path)
    with pytest.raises(WeightsMismatch) as info:
        load_model_weights(_meta_model("mask2former_swin_large_3x"), state, strict=False)
    msg = str(info.value)
    assert "image encoder: weights HorNet (base dim 192, depths 2-3-18-2), model Swin (embed 192" in msg
    assert "unexpected (" in msg and "image_encoder.downsample_layers.0.0.weight" in msg
    assert "missing (" in msg and "image_encoder.patch_embed.proj.weight" in msg
    with pytest.raises(WeightsMismatch, match="has no weights for this model"):
        check_fit(_meta_model("mask2former_swin_large_3x").state_dict(), {"foo.weight": torch.zeros(1)}, strict=False)


# --------------------------------------------------------------------------------------------------
# Command line and our own formats


def test_convert_command_line(tmp_path, capsys):
    cfg, a, b = _tiny_pair("swin")
    torch.save({"model": _official_state(a)}, tmp_path / "official.pth")
    assert main([str(tmp_path / "official.pth"), str(tmp_path / "ours.safetensors"), "--cfg", "tiny", "--strict"]) == 0
    out = capsys.readouterr().out
    assert "layout detectron2" in out and "dropped (loss class weights): criterion_2d.empty_weight, criterion_3d.empty_weight" in out
    assert (tmp_path / "ours.json").is_file()
    state, stored = read_weights(tmp_path / "ours.safetensors")
    assert stored is not None and stored.model == load_config("tiny").model
    assert sorted(state) == sorted(a.state_dict()) and all(torch.equal(state[k], v) for k, v in a.state_dict().items())
    # weights-only .pth without a config, through the module entry point
    result = subprocess.run([sys.executable, "-m", "cropformer.convert", str(tmp_path / "official.pth"), str(tmp_path / "ours.pth")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    payload = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert set(payload) == {"model", "content_checksum"} and all(torch.equal(payload["model"][k], v) for k, v in a.state_dict().items())
    # refusal: the tiny weights do not fit Swin-T; exit status 2 and the first keys named
    assert main([str(tmp_path / "official.pth"), str(tmp_path / "bad.safetensors"), "--cfg", "cropformer_swin_tiny_3x"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "image_encoder.patch_embed.proj.weight [32, 3, 4, 4] vs [96, 3, 4, 4]" in err
    assert "all reshaped (" in err and "image_decoder.query_feat.weight: [12, 64] vs [100, 256]" in err
    assert not (tmp_path / "bad.safetensors").exists()


def test_save_weights_formats(tmp_path):
    cfg, a, _ = _tiny_pair("swin")
    save_weights(a.state_dict(), tmp_path / "w.pth", cfg=cfg)
    state, stored = read_weights(tmp_path / "w.pth")
    assert stored == cfg and all(torch.equal(state[k], v) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match=".safetensors or .pth"):
        save_weights(a.state_dict(), tmp_path / "w.bin")
