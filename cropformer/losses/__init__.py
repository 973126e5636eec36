"""Training objective: one matcher and one criterion (losses/matcher.py, losses/criterion.py) applied to
both decoder levels; `build_criterion` reads the config once and returns the model's full objective."""
from __future__ import annotations

from torch import nn

from .criterion import SetCriterion, build_criteria
from .matcher import HungarianMatcher, PointSampler

__all__ = ["SetCriterion", "HungarianMatcher", "PointSampler", "EntityObjective", "build_criterion"]


class EntityObjective(nn.Module):
    """CropFormer: image-level losses (suffix `_2d`, x0.5) + batch-level losses (`_3d`);
    Mask2Former baseline: image-level losses only (no suffix, x1). Returns the weighted loss dict."""

    def __init__(self, criteria: dict[str, SetCriterion]):
        super().__init__()
        self.criteria = nn.ModuleDict(criteria)

    def forward(self, outputs: dict, targets, sampler: PointSampler | None = None) -> dict:
        losses = {}
        for level, criterion in self.criteria.items():
            losses.update(criterion(outputs[level], targets, sampler))
        return losses


def build_criterion(cfg) -> EntityObjective:
    loss = cfg.loss
    return EntityObjective(
        build_criteria(
            num_classes=cfg.model.num_classes,
            class_weight=loss.class_weight,
            mask_weight=loss.mask_weight,
            dice_weight=loss.dice_weight,
            no_object_weight=loss.no_object_weight,
            num_points=loss.num_points,
            oversample_ratio=loss.oversample_ratio,
            importance_sample_ratio=loss.importance_sample_ratio,
            image_level_scale=loss.image_level_scale,
            batch_level=cfg.model.meta_architecture == "cropformer",
        )
    )
