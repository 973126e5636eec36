"""Hungarian matching of predictions to ground-truth entities (Mask2Former's matcher, views as a dim).

One matcher serves both CropFormer levels: a matching problem is one set of Q predictions against
the targets of one image (image level: T = 1 view) or of one sample across its T views jointly
(batch level). The cost of query q against target j is

    cost_class * (-softmax(logits_q)[label_j]) + cost_mask * BCE + cost_dice * dice,

the mask terms on `num_points` uniformly random points shared by every query, target and view of
the problem (costs over T * num_points samples). The costs of every output (final + auxiliary) and
every problem of an iteration are computed on the device first and copied to the host in ONE
transfer; scipy's `linear_sum_assignment` then solves each problem (the original synchronises once
per output per image).
"""
from __future__ import annotations

from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from cropformer.ops.point_mask import point_mask_cost, sample_uncertain_points


class PointSampler:
    """The random points of one criterion call; subclass it to inject recorded draws.

    Outputs are numbered in the criterion's order: 0 = final prediction, k >= 1 = `aux_outputs[k-1]`.
    Problems are numbered as in `HungarianMatcher.forward`. Draws use `torch.rand` with `generator`
    (None = the global generator): all matcher points first (output-major, problem-minor), then the
    loss points of each output in turn.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def matcher_points(self, output: int, problem: int, num_points: int, device: torch.device) -> torch.Tensor:
        """P x 2 uniform (x, y) in [0, 1) shared by all queries, targets and views of the problem."""
        return torch.rand(1, num_points, 2, device=device, generator=self.generator)[0]

    def loss_points(
        self,
        output: int,
        logits: torch.Tensor,
        index: torch.Tensor,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
    ) -> torch.Tensor:
        """M x P x 2 importance-sampled points of the M matched pairs (rows `index` of K x h x w `logits`)."""
        return sample_uncertain_points(
            logits, num_points, oversample_ratio, importance_sample_ratio, generator=self.generator, index=index
        )


class HungarianMatcher(nn.Module):
    """Mask2Former's Hungarian matcher with a view dimension; batched over outputs and problems.

    Args:
        cost_class, cost_mask, cost_dice: weights of the three cost terms (CropFormer: 2, 5, 5).
        num_points: uniformly random points per problem (12544 in training).
        backend: backend of `cropformer.ops.point_mask_cost`.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        backend: str = "auto",
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.backend = backend

    def cost_matrix(self, pred_logits, pred_masks, target, points) -> torch.Tensor:
        """Q x n cost of one problem (on the device).

        Args:
            pred_logits: Q x (C+1); pred_masks: Q x T x h x w.
            target: dict with "labels" (n), "masks" (R x T x H x W bool, any strides), optional
                "rows" (n int64: which mask rows are the targets; default all R = n) and "valid"
                (R x T bool: False = all-zero target in that view).
            points: P x 2.
        """
        rows = target.get("rows")
        labels = target["labels"]
        prob = pred_logits.float().softmax(-1)
        cost_class = -prob[:, labels]  # Q x n
        bce, dice = point_mask_cost(
            pred_masks, target["masks"], points, gt_valid=target.get("valid"), backend=self.backend
        )
        if rows is not None:
            # costs were computed for every mask row (cheap); keep the problem's targets
            rows = rows.to(bce.device)
            bce, dice = bce[:, rows], dice[:, rows]
        return self.cost_mask * bce + self.cost_class * cost_class + self.cost_dice * dice

    @torch.no_grad()
    def forward(
        self,
        outputs: Sequence[dict],
        targets: Sequence[dict],
        sampler: PointSampler | None = None,
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Match every output against the same targets.

        Args:
            outputs: L dicts (final prediction first, then the auxiliary ones) with "pred_logits"
                N x Q x (C+1) and "pred_masks" N x Q x T x h x w (N problems, T views each).
            targets: N dicts, see `cost_matrix` (masks have the same T as the predictions).
            sampler: draws the matcher points (`PointSampler()` if None).
        Returns:
            L lists of N (pred_idx, tgt_idx) int64 CPU tensors, pred_idx ascending, length
            min(Q, n) (target indices are positions in the problem's "labels").
        """
        sampler = sampler if sampler is not None else PointSampler()
        costs, shapes = [], []
        with torch.autocast(device_type=outputs[0]["pred_masks"].device.type, enabled=False):
            for o, out in enumerate(outputs):
                n_problems = out["pred_logits"].shape[0]
                if n_problems != len(targets):
                    raise ValueError(f"HungarianMatcher: {n_problems} predictions but {len(targets)} targets")
                for i, target in enumerate(targets):
                    pts = sampler.matcher_points(o, i, self.num_points, out["pred_masks"].device)
                    c = self.cost_matrix(out["pred_logits"][i], out["pred_masks"][i], target, pts)
                    costs.append(c.flatten())
                    shapes.append(tuple(c.shape))
        # one device -> host transfer for all outputs and problems
        flat = torch.cat(costs).cpu() if costs else torch.zeros(0)
        host = flat.split([q * n for q, n in shapes])
        indices, k = [], 0
        for out in outputs:
            per_output = []
            for _ in range(len(targets)):
                c = host[k].view(shapes[k]).numpy()
                k += 1
                if c.shape[1] == 0:
                    empty = torch.zeros(0, dtype=torch.int64)
                    per_output.append((empty, empty.clone()))
                    continue
                i, j = linear_sum_assignment(c)
                per_output.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
            indices.append(per_output)
        return indices
