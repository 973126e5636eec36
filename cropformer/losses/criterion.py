"""CropFormer's training objective (paper eq. 7): one set criterion for both decoder levels.

Image level (image decoder, `pred_masks` (B*T) x Q x h x w): each view is matched on its own
against the entities valid in that view. Batch level (batch decoder, `pred_masks` B x Q x T x h x w):
each sample is matched once, jointly over its T views, against all its entities; an entity absent
from a view (not valid there) has an all-zero target in that view. Both use the same matcher and
the same losses, the views being a dimension:

- "labels": cross-entropy over all Q queries (matched -> entity label, others -> no-object), class
  weights [1, ..., 1, eos_coef].
- "masks": sigmoid BCE and dice on `num_points` importance-sampled points per matched
  (prediction, target, view) pair, summed and divided by `num_masks` = the number of targets
  (image level: valid (entity, view) pairs; batch level: entities), all-reduced over ranks and
  clamped to >= 1. At the batch level this is BCE and dice summed over views per entity.

Deep supervision: every auxiliary output is matched again and its losses get the suffix `_{i}`.
`forward` returns the weighted losses with the level's suffix, exactly the original's names
(`loss_ce_2d`, `loss_mask_0_2d`, ..., `loss_dice_2_3d`). Losses run in fp32 with autocast off.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cropformer.ops.point_mask import point_mask_loss

from .matcher import HungarianMatcher, PointSampler


def _num_masks(count: int, device: torch.device) -> float:
    """Targets per rank, averaged over ranks (all-reduce) and clamped to >= 1, as DETR does."""
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor([float(count)], device=device)
        dist.all_reduce(total)
        return max(total.item() / dist.get_world_size(), 1.0)
    return max(float(count), 1.0)


class SetCriterion(nn.Module):
    """DETR-style set criterion: Hungarian matching, then losses picked from a dict and weighted.

    Args:
        matcher: the `HungarianMatcher`.
        num_classes: entity classes (1 for CropFormer), the no-object class comes last.
        weight_dict: weight per base loss name ("loss_ce", "loss_mask", "loss_dice"); auxiliary
            outputs use the same weights (CropFormer image level: 2, 5, 5 times 0.5 = 1, 2.5, 2.5).
        eos_coef: class weight of no-object (0.1).
        losses: which losses, keys of `loss_map` ("labels", "masks").
        num_points, oversample_ratio, importance_sample_ratio: PointRend sampling of the loss points
            (12544, 3.0, 0.75).
        suffix: appended to every returned name ("_2d", "_3d", or "" for Mask2Former).
        backend: backend of `cropformer.ops.point_mask_loss`.

    Targets (`forward`): B dicts with "labels" n int64, "masks" n x T x Hp x Wp bool (padded input
    frame) and optionally "valid" n x T bool (default all True), as the data pipeline delivers them.
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        num_classes: int = 1,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        losses: Sequence[str] = ("labels", "masks"),
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        suffix: str = "",
        backend: str = "auto",
    ):
        super().__init__()
        self.matcher = matcher
        self.num_classes = num_classes
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.suffix = suffix
        self.backend = backend
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # not persistent: a loss constant, not a model weight (keeps it out of checkpoints)
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self.loss_map = {"labels": self.loss_labels, "masks": self.loss_masks}
        unknown = [k for k in self.losses if k not in self.loss_map]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; choose from {list(self.loss_map)}")

    # ---------------------------------------------------------------------------------------------
    # problems: what is matched against what

    def _problems(self, pred_masks: torch.Tensor, targets: Sequence[dict], valid_host: list[torch.Tensor]):
        """Matching problems of one output's shape.

        Returns (batch_level, T, per-problem target dicts for the matcher, per-problem host rows of
        the targets (entity indices), num_targets).
        """
        B = len(targets)
        T = targets[0]["masks"].shape[1]
        if pred_masks.dim() == 5:  # batch level: B x Q x T x h x w, one problem per sample
            if pred_masks.shape[0] != B or pred_masks.shape[2] != T:
                raise ValueError(
                    f"SetCriterion: batch-level pred_masks {tuple(pred_masks.shape)} do not fit {B} samples x {T} views"
                )
            problems, rows = [], []
            for t, v in zip(targets, valid_host):
                # every entity is a target (as the original's prepare_targets_3d), zero where not valid
                problems.append({"labels": t["labels"], "masks": t["masks"], "valid": t.get("valid")})
                rows.append(torch.arange(v.shape[0]))
            return True, T, problems, rows, sum(len(r) for r in rows)
        if pred_masks.dim() != 4 or pred_masks.shape[0] != B * T:
            raise ValueError(
                f"SetCriterion: image-level pred_masks {tuple(pred_masks.shape)} must be (B*T) x Q x h x w with "
                f"B*T = {B}*{T}"
            )
        problems, rows = [], []
        for t, v in zip(targets, valid_host):
            for view in range(T):
                keep = torch.nonzero(v[:, view]).flatten()  # entities valid in this view
                labels = t["labels"][keep.to(t["labels"].device)]
                problems.append({"labels": labels, "masks": t["masks"][:, view : view + 1], "rows": keep})
                rows.append(keep)
        return False, T, problems, rows, sum(len(r) for r in rows)

    # ---------------------------------------------------------------------------------------------
    # losses

    def loss_labels(self, output, targets, indices, num_masks, *, problems, **_):
        """Cross-entropy over all queries; matched queries take their target's label."""
        logits = output["pred_logits"].float()  # N x Q x (C+1)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for i, ((src, tgt), problem) in enumerate(zip(indices, problems)):
            if len(src):
                labels = problem["labels"][tgt.to(problem["labels"].device)]
                classes[i, src.to(logits.device)] = labels.to(logits.device)
        loss = F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight.to(logits.device))
        return {"loss_ce": loss}

    def loss_masks(
        self, output, targets, indices, num_masks, *, output_index, batch_level, num_views, rows, valid_host,
        sampler, **_,
    ):
        """Point-sampled BCE and dice per matched (prediction, target, view) pair, / num_masks."""
        pred_masks = output["pred_masks"]
        Q, T = pred_masks.shape[1], num_views
        h, w = pred_masks.shape[-2:]
        pred_flat = pred_masks.reshape(-1, h, w)  # every (problem, query[, view]) mask as a row
        pred_rows, gt_rows, gt_valid, sample_of_pair = [], [], [], []
        for i, (src, tgt) in enumerate(indices):
            if batch_level:
                b = i
                views = torch.arange(T)
                # pairs in the original's order: entity-major, view-minor
                pr = ((b * Q + src)[:, None] * T + views).flatten()
                ent = rows[i][tgt]
                gr = (ent[:, None] * T + views).flatten()
                gv = valid_host[b][ent].flatten()
            else:
                b, view = divmod(i, T)
                pr = i * Q + src
                gr = rows[i][tgt] * T + view
                gv = torch.ones(len(gr), dtype=torch.bool)
            pred_rows.append(pr)
            gt_rows.append(gr)
            gt_valid.append(gv)
            sample_of_pair.append(torch.full((len(pr),), b, dtype=torch.int64))
        device = pred_masks.device
        pred_rows = torch.cat(pred_rows)
        gt_rows, gt_valid, sample_of_pair = torch.cat(gt_rows), torch.cat(gt_valid), torch.cat(sample_of_pair)
        with torch.no_grad():
            points = sampler.loss_points(
                output_index,
                pred_flat.detach(),
                pred_rows.to(device),
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
        bce, dice = [], []
        for b, t in enumerate(targets):
            # targets of different samples live in different tensors: one call per sample, pairs in order
            sel = torch.nonzero(sample_of_pair == b).flatten()
            if len(sel) == 0:
                continue
            masks = t["masks"].flatten(0, 1)  # (n*T) x Hp x Wp, a view of the compact masks
            sel_dev = sel.to(device)
            lb, ld = point_mask_loss(
                pred_flat,
                masks,
                points[sel_dev],
                pred_index=pred_rows[sel].to(device),
                gt_index=gt_rows[sel].to(masks.device),
                gt_valid=gt_valid[sel].to(masks.device),
                backend=self.backend,
            )
            bce.append(lb)
            dice.append(ld)
        if not bce:  # no targets anywhere: zero losses that stay connected to the graph
            zero = pred_masks.float().sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        return {"loss_mask": torch.cat(bce).sum() / num_masks, "loss_dice": torch.cat(dice).sum() / num_masks}

    # ---------------------------------------------------------------------------------------------

    def compute(self, outputs: dict, targets: Sequence[dict], sampler: PointSampler | None = None):
        """Unweighted losses and the matches.

        Args:
            outputs: decoder output dict ("pred_logits", "pred_masks", optional "aux_outputs").
            targets: B dicts, see the class docstring.
            sampler: draws the matcher and loss points (`PointSampler()` if None).
        Returns:
            (losses: dict "loss_ce", "loss_mask", "loss_dice" and "..._{i}" for aux output i,
             indices: one list of (pred_idx, tgt_idx) per output, final first, problems as matched).
        """
        sampler = sampler if sampler is not None else PointSampler()
        all_outputs = [{k: v for k, v in outputs.items() if k != "aux_outputs"}] + list(outputs.get("aux_outputs", []))
        # the valid flags of all samples to the host in one transfer (they decide the targets)
        valid_host = []
        for t in targets:
            v = t.get("valid")
            valid_host.append(torch.ones(t["masks"].shape[:2], dtype=torch.bool) if v is None else v)
        if valid_host and valid_host[0].device.type != "cpu":
            flat = torch.cat([v.flatten() for v in valid_host]).cpu()
            valid_host = [f.view(v.shape) for f, v in zip(flat.split([v.numel() for v in valid_host]), valid_host)]
        batch_level, T, problems, rows, num_targets = self._problems(all_outputs[0]["pred_masks"], targets, valid_host)
        num_masks = _num_masks(num_targets, all_outputs[0]["pred_masks"].device)

        match_outputs = []
        for out in all_outputs:
            masks = out["pred_masks"]
            if not batch_level:
                masks = masks[:, :, None]  # (B*T) x Q x 1 x h x w: one view per problem
            match_outputs.append({"pred_logits": out["pred_logits"], "pred_masks": masks})
        indices = self.matcher(match_outputs, problems, sampler)

        losses = {}
        device_type = all_outputs[0]["pred_masks"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            for o, (out, idx) in enumerate(zip(all_outputs, indices)):
                tag = "" if o == 0 else f"_{o - 1}"
                for name in self.losses:
                    terms = self.loss_map[name](
                        out,
                        targets,
                        idx,
                        num_masks,
                        problems=problems,
                        output_index=o,
                        batch_level=batch_level,
                        num_views=T,
                        rows=rows,
                        valid_host=valid_host,
                        sampler=sampler,
                    )
                    losses.update({k + tag: v for k, v in terms.items()})
        return losses, indices

    def forward(self, outputs: dict, targets: Sequence[dict], sampler: PointSampler | None = None) -> dict:
        """Weighted losses named as the original's loss dict (`loss_ce{_i}{suffix}` ...)."""
        losses, _ = self.compute(outputs, targets, sampler)
        weighted = {}
        for name, value in losses.items():
            base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
            if base in self.weight_dict:
                weighted[name + self.suffix] = value * self.weight_dict[base]
        return weighted


def build_criteria(
    *,
    num_classes: int = 1,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    no_object_weight: float = 0.1,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    image_level_scale: float = 0.5,
    batch_level: bool = True,
    backend: str = "auto",
) -> dict[str, SetCriterion]:
    """The criteria of a model: {"image": ..., "batch": ...} for CropFormer (suffixes "_2d" / "_3d",
    image level weighted x `image_level_scale`), or {"image": ...} with no suffix and scale 1 for the
    Mask2Former baseline (`batch_level=False`).
    """
    matcher = HungarianMatcher(
        cost_class=class_weight, cost_mask=mask_weight, cost_dice=dice_weight, num_points=num_points, backend=backend
    )
    weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    common = dict(
        matcher=matcher,
        num_classes=num_classes,
        eos_coef=no_object_weight,
        num_points=num_points,
        oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
        backend=backend,
    )
    if not batch_level:
        return {"image": SetCriterion(weight_dict=weights, suffix="", **common)}
    image_weights = {k: v * image_level_scale for k, v in weights.items()}
    return {
        "image": SetCriterion(weight_dict=image_weights, suffix="_2d", **common),
        "batch": SetCriterion(weight_dict=weights, suffix="_3d", **common),
    }
