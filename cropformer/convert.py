"""Checkpoint key mapping: every public layout of CropFormer / Mask2Former / backbone weights -> our names.

The tables in this file ARE the documentation of the mappings; nothing else in the package renames keys.

1. The original implementation (detectron2 names, `CropFormer_*.pth`, `Mask2Former_*.pth`, COCO-entity
   initialisations). Our module tree keeps the original's names inside every component, so prefix
   renames alone map it (`ORIGINAL_TO_OURS`, first matching prefix wins):

       original prefix                                      ours
       backbone.                                            image_encoder.
       sem_seg_head.pixel_decoder.                          pixel_decoder.
       sem_seg_head.predictor.make_3d.enc_crosattn_3d.      association.cross_attention_layers.
       sem_seg_head.predictor.make_3d.enc_selfattn_3d.      association.self_attention_layers.
       sem_seg_head.predictor.make_3d.enc_ffn_3d.           association.ffn_layers.
       sem_seg_head.predictor.                              image_decoder.
       criterion.*, criterion_2d.*, criterion_3d.*          dropped (loss class weights, not model weights)

   Older layouts are first brought to these names (`LEGACY_ORIGINAL_RULES`):
       sem_seg_head.pixel_decoder.pixel_decoder.X   -> sem_seg_head.pixel_decoder.X  (saved after
           detectron2's MaskFormerHead re-prefixed a state dict that had lost its version metadata)
       sem_seg_head.X (X not predictor./pixel_decoder.) -> sem_seg_head.pixel_decoder.X  (MaskFormer
           heads before version 2, the rename MaskFormerHead._load_from_state_dict does)
   The batch decoder has no entries: it runs the image decoder's weights.

2. ImageNet backbone weights (initialisations; `BACKBONE_LAYOUTS`): the names of the released
   classification models equal ours under `image_encoder.`, minus the classifier:
       Swin (official `swin_*.pth`, key "model"; also Mask2Former's converted `swin_*.pkl`):
           patch_embed.*, layers.*  -> image_encoder.*;  head.*, norm.* (final norm) and
           layers.*.attn_mask (a constant for 224 inputs) dropped. detectron2's Swin has output
           norms norm0..norm3 that these files lack: they are reported missing and keep their init.
       HorNet (official `hornet_*.pth`): downsample_layers.*, stages.* -> image_encoder.*;
           head.*, norm.* dropped; norm0..norm3 missing as for Swin.
       ResNet, detectron2 layout (`R-50.pkl` made by detectron2's convert-torchvision-to-d2.py, or
           any detectron2 backbone state): stem.*, res2..res5.* -> image_encoder.*; stem.fc.*/fc.* dropped.
       ResNet, torchvision layout (`resnet50-*.pth`, `TORCHVISION_RESNET_RULES`): conv1/bn1 ->
           stem.conv1(.norm), layer{i}.{b}.conv{j}/bn{j} -> res{i+1}.{b}.conv{j}(.norm),
           downsample.0/.1 -> shortcut(.norm); fc.* dropped.
       Caffe2-named MSRA weights (`conv1_w`, `res2_0_branch2a_w`, ...) are refused with a message.

3. HuggingFace transformers' Mask2FormerForUniversalSegmentation with a Swin backbone
   (`HF_RENAMES`, `hf_to_ours`), in both the names stored on the hub (transformers 4 layout, which
   transformers 5 still writes) and the in-memory names of transformers 5. HF keeps q/k/v projections
   separate; they are concatenated into the original's fused `attn.qkv` / `in_proj_*` (rows q, k, v).

`convert_state_dict` recognises the layout from the key names and applies the right table.
`python -m cropformer.convert SRC DST [--cfg CONFIG]` converts a file (see `main`).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import torch

# --------------------------------------------------------------------------------------------------
# 1. The original implementation (detectron2 names)

# Order matters: the first matching prefix wins (more specific prefixes first).
ORIGINAL_TO_OURS: tuple[tuple[str, str], ...] = (
    ("backbone.", "image_encoder."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("sem_seg_head.predictor.make_3d.enc_crosattn_3d.", "association.cross_attention_layers."),
    ("sem_seg_head.predictor.make_3d.enc_selfattn_3d.", "association.self_attention_layers."),
    ("sem_seg_head.predictor.make_3d.enc_ffn_3d.", "association.ffn_layers."),
    ("sem_seg_head.predictor.", "image_decoder."),
)
DROPPED_PREFIXES: tuple[str, ...] = ("criterion.", "criterion_2d.", "criterion_3d.")
# Older original layouts -> the canonical original names above (regex, replacement; first match wins).
LEGACY_ORIGINAL_RULES: tuple[tuple[str, str], ...] = (
    (r"^sem_seg_head\.pixel_decoder\.pixel_decoder\.", "sem_seg_head.pixel_decoder."),
    (r"^sem_seg_head\.(?!predictor\.|pixel_decoder\.)", "sem_seg_head.pixel_decoder."),
)
# The top-level module names of our model (CropFormer.state_dict()).
OUR_COMPONENTS: tuple[str, ...] = ("image_encoder", "pixel_decoder", "image_decoder", "association")


@dataclass
class ConversionReport:
    """What a conversion did.

    format: the layout recognised ("cropformer", "detectron2", "swin", "hornet", "resnet-d2",
        "resnet-torchvision", "hf-mask2former").
    renamed: source key -> our key, for every key kept.
    dropped: source key -> why, for keys deliberately left out (classifier heads, loss weights, ...).
    unrecognised: source keys no rule covers (a conversion with any is refused by the loaders).
    """

    format: str = "detectron2"
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unrecognised: list[str] = field(default_factory=list)

    def summary(self, limit: int = 10) -> str:
        lines = [f"layout {self.format}: {len(self.renamed)} keys renamed, {len(self.dropped)} dropped, "
                 f"{len(self.unrecognised)} unrecognised"]
        reasons: dict[str, list[str]] = {}
        for key, why in self.dropped.items():
            reasons.setdefault(why, []).append(key)
        for why, keys in reasons.items():
            lines.append(f"  dropped ({why}): {first_keys(keys, limit)}")
        if self.unrecognised:
            lines.append(f"  unrecognised: {first_keys(self.unrecognised, limit)}")
        return "\n".join(lines)


def first_keys(keys: list[str], limit: int = 10) -> str:
    """The first `limit` keys, comma separated, with the total when some are left out."""
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def rename_key(key: str, table=ORIGINAL_TO_OURS) -> str | None:
    """Our name for an original key, or None when no prefix matches."""
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _apply_rules(key: str, rules) -> str:
    """The first regex rule that matches rewrites the key (one rule at most)."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return key


def original_to_ours(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename an original (detectron2-named) CropFormer / Mask2Former state dict to our names.

    Legacy layouts (`LEGACY_ORIGINAL_RULES`) are accepted; criterion buffers are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    report = ConversionReport(format="detectron2")
    for key, value in state_dict.items():
        if key.startswith(DROPPED_PREFIXES):
            report.dropped[key] = "loss class weights"
            continue
        new = rename_key(_apply_rules(key, LEGACY_ORIGINAL_RULES))
        if new is None:
            report.unrecognised.append(key)
            continue
        out[new] = value
        report.renamed[key] = new
    return out, report


def ours_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `original_to_ours` (criterion buffers are not restored)."""
    inverse = tuple((new, old) for old, new in ORIGINAL_TO_OURS)
    # Longer (more specific) prefixes first so association.* does not fall into a shorter rule.
    inverse = tuple(sorted(inverse, key=lambda p: -len(p[0])))
    out = {}
    for key, value in state_dict.items():
        old = rename_key(key, inverse)
        if old is None:
            raise KeyError(f"no original name for {key!r}")
        out[old] = value
    return out


# --------------------------------------------------------------------------------------------------
# 2. ImageNet backbone weights


@dataclass(frozen=True)
class BackboneLayout:
    """A classification backbone's checkpoint: `detect` matches its keys; `renames` (regex rules, first
    match wins) bring a key to our image encoder's names (then prefixed `image_encoder.`); keys
    matching a `drop` pattern are left out for the reason given."""

    name: str
    detect: str
    drop: tuple[tuple[str, str], ...]
    renames: tuple[tuple[str, str], ...] = ()


TORCHVISION_RESNET_RULES: tuple[tuple[str, str], ...] = (
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut."),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
)
_CLASSIFIER = "ImageNet classifier"
BACKBONE_LAYOUTS: tuple[BackboneLayout, ...] = (
    BackboneLayout(
        "swin", r"^layers\.\d+\.blocks\.\d+\.attn\.",
        drop=((r"^head\.", _CLASSIFIER), (r"^norm\.", "final norm of the classifier"),
              (r"\.attn_mask$", "shifted-window mask for one input size, recomputed per input")),
    ),
    BackboneLayout(
        "hornet", r"^stages\.\d+\.\d+\.gnconv\.",
        drop=((r"^head\.", _CLASSIFIER), (r"^norm\.", "final norm of the classifier")),
    ),
    BackboneLayout(
        "resnet-d2", r"^res[2-5]\.\d+\.conv1\.weight$",
        drop=((r"^(stem\.)?fc\.", _CLASSIFIER),),
    ),
    BackboneLayout(
        "resnet-torchvision", r"^layer[1-4]\.\d+\.conv1\.weight$",
        drop=((r"^fc\.", _CLASSIFIER),),
        renames=TORCHVISION_RESNET_RULES,
    ),
)


def backbone_to_ours(state_dict: dict[str, torch.Tensor], layout: BackboneLayout
                     ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """ImageNet weights of a backbone -> our `image_encoder.*` names (classifier parts dropped)."""
    out: dict[str, torch.Tensor] = {}
    report = ConversionReport(format=layout.name)
    for key, value in state_dict.items():
        why = next((reason for pattern, reason in layout.drop if re.search(pattern, key)), None)
        if why is not None:
            report.dropped[key] = why
            continue
        new = "image_encoder." + _apply_rules(key, layout.renames)
        out[new] = value
        report.renamed[key] = new
    return out, report


# --------------------------------------------------------------------------------------------------
# 3. HuggingFace transformers' Mask2Former (Swin backbone)

_HF_SWIN = r"^model\.pixel_level_module\.encoder\.(?:swin\.)?"  # transformers 5 adds `swin.` in memory
_HF_BLOCK = r"^(image_encoder\.layers\.\d+\.blocks\.\d+\.)"
# HF name -> ours. Each pass applies the first rule that matches; passes repeat until none does (block
# and layer keys take two steps: prefix, then the module name). Hub files (transformers 4 names) and
# transformers 5 in-memory names are both covered; q/k/v projections are fused afterwards.
HF_RENAMES: tuple[tuple[str, object], ...] = (
    # Swin backbone
    (_HF_SWIN + r"embeddings\.patch_embeddings\.projection\.", "image_encoder.patch_embed.proj."),
    (_HF_SWIN + r"embeddings\.norm\.", "image_encoder.patch_embed.norm."),
    (_HF_SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.", r"image_encoder.layers.\1.blocks.\2."),
    (_HF_SWIN + r"encoder\.layers\.(\d+)\.downsample\.", r"image_encoder.layers.\1.downsample."),
    (r"^model\.pixel_level_module\.encoder\.hidden_states_norms\.stage(\d)\.",
     lambda m: f"image_encoder.norm{int(m[1]) - 1}."),
    (_HF_BLOCK + r"layernorm_before\.", r"\1norm1."),
    (_HF_BLOCK + r"layernorm_after\.", r"\1norm2."),
    (_HF_BLOCK + r"attention\.relative_position_bias\.", r"\1attn."),  # transformers 5
    (_HF_BLOCK + r"attention\.self\.relative_position_bias_table$", r"\1attn.relative_position_bias_table"),
    (_HF_BLOCK + r"attention\.o_proj\.", r"\1attn.proj."),
    (_HF_BLOCK + r"attention\.output\.dense\.", r"\1attn.proj."),  # hub
    (_HF_BLOCK + r"attention\.([qkv])_proj\.", r"\1attn.\2_proj."),
    (_HF_BLOCK + r"attention\.self\.query\.", r"\1attn.q_proj."),  # hub
    (_HF_BLOCK + r"attention\.self\.key\.", r"\1attn.k_proj."),
    (_HF_BLOCK + r"attention\.self\.value\.", r"\1attn.v_proj."),
    (_HF_BLOCK + r"intermediate\.dense\.", r"\1mlp.fc1."),  # hub
    (_HF_BLOCK + r"output\.dense\.", r"\1mlp.fc2."),
    # pixel decoder
    (r"^model\.pixel_level_module\.decoder\.level_embed$", "pixel_decoder.transformer.level_embed"),
    (r"^model\.pixel_level_module\.decoder\.input_projections\.", "pixel_decoder.input_proj."),
    (r"^model\.pixel_level_module\.decoder\.encoder\.layers\.", "pixel_decoder.transformer.encoder.layers."),
    (r"^model\.pixel_level_module\.decoder\.mask_projection\.", "pixel_decoder.mask_features."),
    (r"^model\.pixel_level_module\.decoder\.(adapter|layer)_(\d+)\.0\.", r"pixel_decoder.\1_\2."),
    (r"^model\.pixel_level_module\.decoder\.(adapter|layer)_(\d+)\.1\.", r"pixel_decoder.\1_\2.norm."),
    (r"^(pixel_decoder\.transformer\.encoder\.layers\.\d+\.)self_attn_layer_norm\.", r"\1norm1."),
    (r"^(pixel_decoder\.transformer\.encoder\.layers\.\d+\.)final_layer_norm\.", r"\1norm2."),
    (r"^(pixel_decoder\.transformer\.encoder\.layers\.\d+\.)fc(\d)\.", r"\1linear\2."),
    # masked-attention decoder
    (r"^model\.transformer_module\.queries_embedder\.", "image_decoder.query_embed."),
    (r"^model\.transformer_module\.queries_features\.", "image_decoder.query_feat."),
    (r"^model\.transformer_module\.level_embed\.", "image_decoder.level_embed."),
    (r"^model\.transformer_module\.decoder\.layernorm\.", "image_decoder.decoder_norm."),
    (r"^model\.transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.",
     r"image_decoder.mask_embed.layers.\1."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.",
     r"image_decoder.transformer_self_attention_layers.\1.self_attn.\2_proj."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"image_decoder.transformer_self_attention_layers.\1.self_attn.out_proj."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"image_decoder.transformer_self_attention_layers.\1.norm."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn\.",
     r"image_decoder.transformer_cross_attention_layers.\1.multihead_attn."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn_layer_norm\.",
     r"image_decoder.transformer_cross_attention_layers.\1.norm."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.fc(\d)\.",
     r"image_decoder.transformer_ffn_layers.\1.linear\2."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.final_layer_norm\.",
     r"image_decoder.transformer_ffn_layers.\1.norm."),
    (r"^class_predictor\.", "image_decoder.class_embed."),
)
# HF keys with no counterpart, and why.
HF_DROPPED: tuple[tuple[str, str], ...] = (
    (r"^criterion\.", "loss class weights"),
    # The classification Swin's final LayerNorm: SwinBackbone never calls it (it normalises each stage).
    (r"^model\.pixel_level_module\.encoder\.(swin\.)?layernorm\.", "final norm of the classification Swin"),
    (r"relative_position_index$", "constant, recomputed by our model from the window size"),
)


def _hf_rename(key: str) -> str:
    """Apply the HF rename rules until none matches."""
    for _ in range(len(HF_RENAMES)):  # each pass changes the key; more passes than rules would be a cycle
        for pattern, repl in HF_RENAMES:
            new, n = re.subn(pattern, repl, key, count=1)
            if n:
                key = new
                break
        else:
            return key
    raise RuntimeError(f"HF rename rules cycle on {key!r}")


def hf_to_ours_with_report(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """HF Mask2FormerForUniversalSegmentation state dict -> ours (mask2former), with a report.

    Split projections are merged into the original's fused ones: Swin `{q,k,v}_proj` -> `attn.qkv`
    ([3C, C], rows q then k then v) and the decoder's self-attention `{q,k,v}_proj` ->
    `self_attn.in_proj_{weight,bias}` (nn.MultiheadAttention layout, also q, k, v). HF's decoder
    cross attention already is an nn.MultiheadAttention. A Mask2FormerModel state dict (no `model.`
    prefix, no class predictor) is accepted too.
    """
    report = ConversionReport(format="hf-mask2former")
    renamed: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for key, value in hf_state.items():
        full = "model." + key if key.startswith(("pixel_level_module.", "transformer_module.")) else key
        why = next((reason for pattern, reason in HF_DROPPED if re.search(pattern, full)), None)
        if why is not None:
            report.dropped[key] = why
            continue
        new = _hf_rename(full)
        if not new.startswith(("image_encoder.", "pixel_decoder.", "image_decoder.")):
            report.unrecognised.append(key)
            continue
        renamed[new] = value
        source_of[new] = key
    out = {}
    for key, value in renamed.items():
        m = re.match(r"^(.*)\.([qkv])_proj\.(weight|bias)$", key)
        if m is None:
            out[key] = value
            report.renamed[source_of[key]] = key
            continue
        prefix, which, kind = m.groups()
        fused = f"{prefix}.qkv.{kind}" if prefix.endswith(".attn") else f"{prefix}.in_proj_{kind}"
        parts = [f"{prefix}.{w}_proj.{kind}" for w in "qkv"]
        if any(p not in renamed for p in parts):
            report.unrecognised.append(source_of[key] + " (its q/k/v partners are missing)")
            continue
        report.renamed[source_of[key]] = fused
        if which == "q":
            out[fused] = torch.cat([renamed[p] for p in parts], 0)
    return out, report


def hf_to_ours(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Mask2FormerForUniversalSegmentation state dict -> our CropFormer (mask2former) state dict.

    Raises KeyError on any HF key the rules do not cover (see `hf_to_ours_with_report`).
    """
    out, report = hf_to_ours_with_report(hf_state)
    if report.unrecognised:
        raise KeyError(f"no mapping for HF keys {report.unrecognised[:10]}")
    return out


# --------------------------------------------------------------------------------------------------
# Any layout


_CAFFE2_KEYS = re.compile(r"^(conv1_w|res_conv1_bn_s|res\d_\d+_branch\d[a-c]?_w)$")
_HF_KEYS = re.compile(r"^(model\.)?(pixel_level_module|transformer_module)\.|^class_predictor\.")


def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    """The layout of a state dict, from its key names (see the module docstring)."""
    keys = list(state_dict)
    if keys and all(k.split(".", 1)[0] in OUR_COMPONENTS for k in keys):
        return "cropformer"
    if any(_HF_KEYS.match(k) for k in keys):  # before detectron2: HF files also hold `criterion.empty_weight`
        return "hf-mask2former"
    if any(k.startswith(("sem_seg_head.", "backbone.")) or k.startswith(DROPPED_PREFIXES) for k in keys):
        return "detectron2"
    for layout in BACKBONE_LAYOUTS:
        if any(re.search(layout.detect, k) for k in keys):
            return layout.name
    if any(_CAFFE2_KEYS.match(k) for k in keys):
        return "caffe2"
    return "unknown"


def _strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved from a DistributedDataParallel wrapper carry `module.` on every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Any supported layout -> our names, with a report. Raises ValueError for an unknown layout."""
    state_dict = _strip_ddp_prefix(dict(state_dict))
    fmt = detect_format(state_dict)
    if fmt == "cropformer":
        return state_dict, ConversionReport(format=fmt, renamed={k: k for k in state_dict})
    if fmt == "detectron2":
        return original_to_ours(state_dict)
    if fmt == "hf-mask2former":
        return hf_to_ours_with_report(state_dict)
    for layout in BACKBONE_LAYOUTS:
        if layout.name == fmt:
            return backbone_to_ours(state_dict, layout)
    if fmt == "caffe2":
        raise ValueError(
            "Caffe2-named weights (MSRA R-50.pkl: conv1_w, res2_0_branch2a_w, ...) are not supported: they "
            "expect BGR input with unit std and stride in the 1x1 conv; use the torchvision ResNet weights "
            "(resnet50-*.pth) or detectron2's ImageNetPretrained/torchvision/R-50.pkl instead"
        )
    raise ValueError(
        "unknown checkpoint layout: the keys match none of CropFormer/Mask2Former (detectron2 or ours), "
        "Swin/HorNet/ResNet ImageNet weights or HF Mask2Former; first keys: " + first_keys(list(state_dict), 8)
    )


if __name__ == "__main__":  # `python -m cropformer.convert` = `cropformer convert`
    from .cli import run
    from .cli.convert import main

    sys.exit(run(main))
