"""`paste_entities` reproduces the released CropFormer's final masks and scores on the golden run.

Inputs (reference/golden_tiny, inference run (b)): the batch decoder's final class logits
`infer.decoder_3d.pred_logits[-1]` (class score = softmax[..., 0]) and mask logits
`infer.decoder_3d.pred_masks_last` (1 x Q=12 x V=5 x 40 x 56), the views' sizes `infer.image_sizes`,
the crop boxes `infer.crop_region` (inputs.pt), output 160 x 224, score_mode="original".
Expected: `infer.result.pred_masks` (Q masks ordered by descending class score) as an id map, and
`infer.result.scores` in the same order.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cropformer.ops._dispatch import has_compiled_op
from cropformer.ops.paste import _rank_order, paste_entities
from tests.conftest import assert_close, load_reference


def golden_case():
    out = load_reference("golden_tiny", "outputs.pt")
    inp = load_reference("golden_tiny", "inputs.pt")
    H, W = (int(s) for s in out["infer.result.image_size"])
    class_scores = out["infer.decoder_3d.pred_logits"][-1][0].softmax(-1)[:, 0]  # Q
    logits = out["infer.decoder_3d.pred_masks_last"][0].transpose(0, 1).contiguous()  # V x Q x 40 x 56
    boxes = torch.cat([torch.tensor([[0, 0, W, H]]), inp["infer.crop_region"]])  # full view, then crops
    # Result entry i is query order[i] (descending class score; the golden scores are all distinct).
    order = _rank_order(class_scores)
    masks = out["infer.result.pred_masks"]
    assert (masks.sum(0) <= 1).all(), "golden masks overlap"
    id_map = torch.zeros(H, W, dtype=torch.int32)
    for i, q in enumerate(order.tolist()):
        id_map[masks[i]] = q + 1
    scores = torch.zeros_like(class_scores)
    scores[order] = out["infer.result.scores"]
    return (logits, out["infer.image_sizes"], boxes, class_scores, (H, W)), id_map, scores


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_golden_inference_result(backend):
    if backend == "cpu" and not has_compiled_op("paste_entities"):
        pytest.skip("compiled paste_entities not built (setup.py, or CROPFORMER_JIT_OPS=paste)")
    args, expected_ids, expected_scores = golden_case()
    id_map, scores, areas = paste_entities(*args, score_mode="original", backend=backend)
    diff = id_map != expected_ids
    assert not diff.any(), f"{int(diff.sum())} pixels differ, first {torch.nonzero(diff)[:5].tolist()}"
    assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5, name="scores")
    assert torch.equal(areas, torch.bincount(expected_ids.flatten().long(), minlength=13)[1:])
    # Empty masks score 0, as in the released output (2 of the 12 here).
    assert ((areas == 0) == (expected_scores == 0)).all() and (areas == 0).sum() == 2


def _original_counts(logits, sizes, boxes, class_scores, H, W, threshold=0.5):
    """Float32 transcription of the released code's fusion for views that need not cover the image:
    per view x4, cut, resize to its box, sigmoid; summed and divided by (count + 1e-16), as
    `inference_whole_views` does; masks painted in ascending class score. Returns the id map and the
    fused probabilities."""
    V, Q, h, w = logits.shape
    fused = torch.zeros(Q, H, W)
    valid = torch.zeros(Q, H, W) + 1e-16
    up = F.interpolate(logits, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
    for v, ((rows, cols), (x0, y0, x1, y1)) in enumerate(zip(sizes.tolist(), boxes.tolist())):
        view = F.interpolate(up[v : v + 1, :, :rows, :cols], size=(y1 - y0, x1 - x0), mode="bilinear",
                             align_corners=False)
        fused[:, y0:y1, x0:x1] += view[0].sigmoid()
        valid[:, y0:y1, x0:x1] += 1
    fused = fused / valid
    id_map = torch.zeros(H, W, dtype=torch.int32)
    for q in _rank_order(class_scores).flip(0).tolist():
        id_map[fused[q] > threshold] = q + 1
    return id_map, fused


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_golden_views_that_leave_pixels_uncovered(backend):
    """Our paste against the original's (count + 1e-16) division where it matters: with only two
    opposite golden crops, two corners of the image are covered by no view (the original's 0 / 1e-16 =
    0: no entity) and the middle by both. Pixels may differ only where a fused probability lies within
    1e-5 of the threshold (float32 vs float64)."""
    if backend == "cpu" and not has_compiled_op("paste_entities"):
        pytest.skip("compiled paste_entities not built (setup.py, or CROPFORMER_JIT_OPS=paste)")
    (logits, sizes, boxes, class_scores, (H, W)), _, _ = golden_case()
    keep = [1, 4]  # top-left and bottom-right crops
    logits, sizes, boxes = logits[keep].contiguous(), sizes[keep], boxes[keep]
    expected, fused = _original_counts(logits, sizes, boxes, class_scores, H, W)
    id_map, _, areas = paste_entities(logits, sizes, boxes, class_scores, (H, W), backend=backend)
    uncovered = torch.ones(H, W, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        uncovered[y0:y1, x0:x1] = False
    assert uncovered.sum() > 1000 and (id_map[uncovered] == 0).all()
    near = ((fused - 0.5).abs() <= 1e-5).any(0)
    diff = id_map != expected
    assert not (diff & ~near).any(), f"{int((diff & ~near).sum())} pixels differ away from the threshold"
    assert (expected > 0).sum() > 0.1 * H * W and torch.equal(areas.sum(), (id_map > 0).sum())
