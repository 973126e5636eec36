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


def test_golden_count_epsilon_is_inert():
    """The original divides the summed probabilities by (count + 1e-16); in float32 (and float64)
    count + 1e-16 == count for every count >= 1, and uncovered pixels (count 0) do not occur here
    (the full view covers the image), so leaving the epsilon out changes nothing."""
    for dtype in (torch.float32, torch.float64):
        counts = torch.arange(1, 6, dtype=dtype)
        assert torch.equal(counts + 1e-16, counts)
