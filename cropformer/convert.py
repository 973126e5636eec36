"""Checkpoint key mapping between the original implementation (detectron2 names) and ours.

The rename table below IS the documentation of the mapping: our module tree keeps the original's
names inside every component, so an original state dict maps onto ours by prefix renames alone.

    original prefix                                      ours
    backbone.                                            image_encoder.
    sem_seg_head.pixel_decoder.                          pixel_decoder.
    sem_seg_head.predictor.make_3d.enc_crosattn_3d.      association.cross_attention_layers.
    sem_seg_head.predictor.make_3d.enc_selfattn_3d.      association.self_attention_layers.
    sem_seg_head.predictor.make_3d.enc_ffn_3d.           association.ffn_layers.
    sem_seg_head.predictor.                              image_decoder.
    criterion.*, criterion_2d.*, criterion_3d.*          dropped (loss class weights, not model weights)

The batch decoder has no entries: it runs the image decoder's weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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


@dataclass
class ConversionReport:
    """What a conversion did: renamed keys, dropped keys and keys it did not recognise."""

    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.renamed)} keys renamed, {len(self.dropped)} dropped, {len(self.unrecognised)} unrecognised"]
        if self.unrecognised:
            lines.append("unrecognised: " + ", ".join(self.unrecognised[:10]) + (" ..." if len(self.unrecognised) > 10 else ""))
        return "\n".join(lines)


def rename_key(key: str, table=ORIGINAL_TO_OURS) -> str | None:
    """Our name for an original key, or None when no prefix matches."""
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def original_to_ours(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename an original (detectron2-named) CropFormer / Mask2Former state dict to our names."""
    out: dict[str, torch.Tensor] = {}
    report = ConversionReport()
    for key, value in state_dict.items():
        if key.startswith(DROPPED_PREFIXES):
            report.dropped.append(key)
            continue
        new = rename_key(key)
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
